"""kdpipe: offline knowledge distillation for audio tagging.

The library behind the `kdpipe` CLI: config, stage cache, manifests, audio
ingest and stores. Stages (in `stages/`) compose these pieces.
"""

__version__ = "0.1.0"
