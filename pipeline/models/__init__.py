"""Model families and the registry: one name space for students and teachers.

`create_model(name, **overrides)` builds any registered model as a plain
`nn.Module` whose state-dict keys match the published checkpoints;
`load_checkpoint(model, path)` loads one strictly and explains a mismatch;
`load_for_finetuning(model, path)` starts a training from a checkpoint of another task (ImageNet's
1,000 classes, AudioSet's 527): the body strictly, a head that does not fit afresh;
`create_model(name, checkpoint=path)` reads the input geometry (stride, time
length) of transformer checkpoints from their positional embeddings instead of
trusting the file name.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.errors import KdpipeError
from kdpipe.models.ast import AST, AST_CONFIGS, infer_ast_config, strip_module_prefix
from kdpipe.models.dymn import DYMN_NAME_TO_WIDTH, DyMN
from kdpipe.models.mobilenet import NAME_TO_WIDTH, MobileNetV3
from kdpipe.models.passt import PASST_CONFIGS, PaSST, infer_passt_config

# Each entry is the class with its preset keyword arguments; any of them can be overridden.
_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    **{name: partial(MobileNetV3, width=width) for name, width in NAME_TO_WIDTH.items()},
    "mobilenetv3": MobileNetV3,
    "mn_tiny": partial(MobileNetV3, width=0.1),
    **{name: partial(DyMN, width=width) for name, width in DYMN_NAME_TO_WIDTH.items()},
    "dymn": DyMN,
    "dymn_tiny": partial(DyMN, width=0.1),
    **{name: partial(PaSST, **config) for name, config in PASST_CONFIGS.items()},
    **{name: partial(AST, **config) for name, config in AST_CONFIGS.items()},
}

# Constructor arguments read off a checkpoint's shapes, given the model its name builds (for the input size).
_INFER: dict[type, Callable[[dict[str, torch.Tensor], nn.Module], dict[str, Any]]] = {
    PaSST: lambda state, model: infer_passt_config(state, input_fdim=model.frontend_config["n_mels"]),
    AST: lambda state, model: infer_ast_config(state, input_fdim=model.frontend_config["n_mels"],
                                               input_tdim=model.frontend_config["target_frames"]),
    MobileNetV3: lambda state, model: {"num_classes": _mobilenet_classes(state)},
    DyMN: lambda state, model: {"num_classes": _mobilenet_classes(state)},
}

HEADS: dict[type, tuple[str, ...]] = {
    MobileNetV3: ("classifier.",), DyMN: ("classifier.",), PaSST: ("head.", "head_dist."), AST: ("mlp_head.",)}
"""State-dict prefixes of each family's classification head: what fine-tuning may start afresh."""

WIDTH_FREE = {"mobilenetv3": NAME_TO_WIDTH, "dymn": DYMN_NAME_TO_WIDTH}
"""The registry entries that take any `width`, and their named presets (mn10 is mobilenetv3 at 1.0)."""


def _mobilenet_classes(state: dict[str, torch.Tensor]) -> int:
    """The output width of the head's last layer (state dicts keep module order)."""
    return [v for k, v in state.items() if k.startswith("classifier.") and k.endswith("weight")][-1].shape[0]


def list_models() -> list[str]:
    return sorted(_FACTORIES)


def check_model_name(name: str) -> None:
    """Raise KdpipeError naming close matches and the registry if `name` is not a registered model."""
    if name not in _FACTORIES:
        close = difflib.get_close_matches(name, _FACTORIES, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise KdpipeError(f"unknown model {name!r}; {hint}registry: {', '.join(list_models())}")


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise KdpipeError if `options` names an argument that model `name`'s constructor does not take."""
    check_model_name(name)
    accepted = set(inspect.signature(_FACTORIES[name]).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise KdpipeError(f"{name} takes no option {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}")


def create_model(name: str, checkpoint: Path | None = None, **overrides: Any) -> nn.Module:
    """Build model `name`; with `checkpoint`, size it from the file's shapes and load it strictly."""
    check_model_name(name)
    if checkpoint is None:
        return _FACTORIES[name](**overrides)
    state = read_state_dict(checkpoint)
    model = _FACTORIES[name](**overrides)
    infer = _INFER.get(type(model))
    try:
        inferred = infer(state, model) if infer is not None else None
    except (KeyError, IndexError, ValueError):
        inferred = None  # another family's checkpoint: the strict load below says what does not match
    if inferred is not None:
        inferred.update(overrides)
        model = _FACTORIES[name](**inferred)
    _load_strict(model, state, checkpoint)
    if isinstance(model, DyMN):
        model.set_temperature(model.schedule["t_min"])  # trained weights run where their schedule ended
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, `module.` (DataParallel) prefixes stripped; loaded with weights_only=True."""
    if not Path(path).is_file():
        raise KdpipeError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise KdpipeError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdpipeError(f"{path}: expected a state dict of tensors")
    return strip_module_prefix(state)


def load_checkpoint(model: nn.Module, path: Path) -> nn.Module:
    """Load `path` into `model` strictly; on mismatch, say which keys and the likely cause."""
    _load_strict(model, read_state_dict(path), path)
    return model


def load_for_finetuning(model: nn.Module, path: Path) -> list[str]:
    """Load `path` into `model` as the start of a training on other classes: every body key strictly; head keys
    (`HEADS`) that the file lacks, has extra or shapes differently (1,000 ImageNet classes, another class count,
    another head type) keep the model's fresh init. Returns the names of those fresh layers; any mismatch
    outside the head is the strict load's error."""
    state = read_state_dict(path)
    expected = model.state_dict()
    differs = (expected.keys() ^ state.keys()) | {
        key for key in expected.keys() & state.keys() if expected[key].shape != state[key].shape}
    head = HEADS.get(type(model), ())
    if not differs or not head or not all(key.startswith(head) for key in differs):
        _load_strict(model, state, path)
        return []
    kept = {key: value for key, value in state.items() if key not in differs}
    _load_strict(model, {**kept, **{key: expected[key] for key in differs if key in expected}}, path)
    return sorted({key.rsplit(".", 1)[0] for key in differs if key in expected})


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        raise KdpipeError(_mismatch_message(model, state, path, missing, unexpected, misshaped))
    model.load_state_dict(state, strict=True)


def _mismatch_message(model: nn.Module, state: dict[str, torch.Tensor], path: Path, missing: list[str],
                      unexpected: list[str], misshaped: list[str]) -> str:
    expected = model.state_dict()
    lines = [f"{path} does not match {type(model).__name__}:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {len(keys)} {title} key(s): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    for key in misshaped[:6]:
        lines.append(f"  {key}: checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)}")
    lines.append(f"  likely cause: {_likely_cause(model, state, missing, misshaped)}")
    return "\n".join(lines)


def _likely_cause(model: nn.Module, state: dict[str, torch.Tensor], missing: list[str], misshaped: list[str]
                  ) -> str:
    if len(missing) > len(model.state_dict()) / 2:
        return (f"a checkpoint of another architecture: its keys start with {_top_level(state)}, "
                f"{type(model).__name__}'s with {_top_level(model.state_dict())}")
    head = [k for k in misshaped if k.startswith(("classifier", "head", "mlp_head"))]
    last_conv = {MobileNetV3: lambda: f"features.{len(model.features) - 1}.0.weight",
                 DyMN: lambda: "out_c.0.weight"}.get(type(model))
    if last_conv is not None:
        last = state.get(last_conv())
        if last is not None and last.shape[0] != model.embedding_dim:
            return (f"a different width: the checkpoint's last conv has {last.shape[0]} channels "
                    f"(width {last.shape[0] / 960:g}), the model {model.embedding_dim} (width {model.width:g})")
    infer = _INFER.get(type(model))
    if infer is not None and any("pos_embed" in k for k in misshaped):
        try:
            implied = f"imply {infer(state, model)}"
        except ValueError as exc:
            implied = f"do not fit this input size ({exc})"
        return f"a different stride or input length; the checkpoint's positional embeddings {implied}"
    if head and len(head) == len(misshaped):
        return "a different number of classes (pass num_classes=...)"
    return "a checkpoint of another architecture or head type"


def _top_level(state: dict[str, torch.Tensor]) -> str:
    return ", ".join(dict.fromkeys(key.split(".")[0] for key in state))
