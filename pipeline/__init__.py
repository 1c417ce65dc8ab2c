"""kdpipe: offline knowledge distillation for audio tagging.

The library behind the `kdpipe` CLI: config, stage cache, manifests, audio ingest, stores,
models and training; `kdpipe.stages` composes them into the pipeline's stages.

    import kdpipe
    student = kdpipe.create_model("mn10")

The model registry is imported on first use, so `import kdpipe` (and `kdpipe --help`)
does not load torch.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {"create_model": "kdpipe.models", "list_models": "kdpipe.models", "load_checkpoint": "kdpipe.models",
         "load_config": "kdpipe.config"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdpipe' has no attribute {name!r}")
