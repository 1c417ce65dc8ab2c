# kdpipe on a CUDA machine. Build: docker build -t kdpipe .
# Run:   docker run --gpus all -v /data:/data kdpipe run --config /data/audioset.yaml
FROM pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

WORKDIR /opt/kdpipe
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY configs ./configs
# torch 2.11 comes with the base image; pip keeps it and adds the rest.
RUN pip install --no-cache-dir . && kdpipe --help > /dev/null

WORKDIR /work
ENTRYPOINT ["kdpipe"]
CMD ["--help"]
