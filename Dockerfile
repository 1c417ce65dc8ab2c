# kdpipe on a CUDA machine. Build: docker build -t kdpipe .
# Run:   docker run --gpus all -v /data:/data kdpipe run --config /data/audioset.yaml
# The base image carries torch 2.11.0, the release pyproject.toml pins (torch==2.11.0).
FROM pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

WORKDIR /opt/kdpipe
COPY pyproject.toml README.md constraints.txt ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY configs ./configs
# The tested versions of everything but torch, its CUDA wheels and triton, which the image provides;
# the import check fails the build if torchaudio does not load beside the image's torch.
RUN grep -vE '^(torch|torchaudio|torchvision|triton|nvidia-|cuda-)' constraints.txt > /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt . \
    && python -c "import torchaudio.compliance.kaldi, torchvision" && kdpipe --help > /dev/null

WORKDIR /work
ENTRYPOINT ["kdpipe"]
CMD ["--help"]
