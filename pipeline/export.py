"""Export a tagger to ONNX or TorchScript for deployment, and check the file against torch.

With its frontend the graph takes float32 waveforms (batch, samples) at the store's rate; without
it, the model's input features (batch, 1, bins, frames). Both return logits (batch, classes) and
have a dynamic batch size. The file carries what a deployment needs to use it (class names, rate,
clip length, frontend settings): as ONNX metadata_props (each value JSON-encoded) or as a
TorchScript extra file `kdpipe.json`; `read_metadata` reads either.

The parity check runs the written file (onnxruntime, or torch.jit.load) and torch on the same
audio at batch sizes other than the traced one, and reports the largest absolute logit difference.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from kdpipe.tagger import Tagger

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[Format, ...] = ("onnx", "torchscript")
SUFFIXES: dict[Format, str] = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
METADATA_FILE = "kdpipe.json"
METADATA_FORMAT = "kdpipe.tagger/1"
TRACE_BATCH = 2
PARITY_BATCHES = (1, 3)
PARITY_TOLERANCE = 1e-4


class WaveformTagger(nn.Module):
    """Frontend then model: waveforms in, logits out, as a deployment runs it."""

    def __init__(self, frontend: nn.Module, model: nn.Module):
        super().__init__()
        self.frontend, self.model = frontend, model

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return self.model(self.frontend(waveforms))


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float  # exported file against torch, over PARITY_BATCHES
    metadata: dict[str, Any]


def export_tagger(tagger: Tagger, path: Path, format: Format, with_frontend: bool = True) -> ExportResult:
    """Write `tagger` (on the CPU) as `format` to `path`, then check the file against torch."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if tagger.device.type != "cpu":
        raise ValueError("export a tagger loaded on the CPU")
    module = (WaveformTagger(tagger.frontend, tagger.model) if with_frontend else tagger.model).eval()
    inputs = {batch: example_input(tagger, batch, with_frontend) for batch in (TRACE_BATCH, *PARITY_BATCHES)}
    metadata = describe(tagger, with_frontend, inputs[TRACE_BATCH].shape[1:])
    path.parent.mkdir(parents=True, exist_ok=True)
    write = _write_onnx if format == "onnx" else _write_torchscript
    write(module, inputs[TRACE_BATCH], metadata, path)
    exported = load_exported(path)
    with torch.inference_mode():
        diff = max(float(np.abs(exported(inputs[batch].numpy()) - module(inputs[batch]).numpy()).max())
                   for batch in PARITY_BATCHES)
    return ExportResult(path, diff, metadata)


def example_input(tagger: Tagger, batch: int, with_frontend: bool) -> torch.Tensor:
    """Seeded broadband noise, one clip per row (or its features): the same for every export."""
    generator = torch.Generator().manual_seed(batch)
    waveforms = 0.1 * torch.randn(batch, tagger.clip_samples, generator=generator)
    if with_frontend:
        return waveforms
    with torch.no_grad():  # not inference_mode: torch.export cannot trace inference tensors
        return tagger.frontend(waveforms)


def describe(tagger: Tagger, with_frontend: bool, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """What a deployment needs to feed the exported graph and read its output."""
    return {
        "format": METADATA_FORMAT,
        "model": tagger.name,
        "input": "waveform" if with_frontend else "features",
        "input_shape": ["batch", *input_shape],
        "output": "logits",
        "sample_rate": tagger.sample_rate,
        "clip_seconds": tagger.clip_seconds,
        "frontend": tagger.frontend_config,
        "class_mids": list(tagger.classes.mids),
        "class_names": list(tagger.classes.names),
    }


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata an exported ONNX or TorchScript file carries."""
    if not _is_torchscript(path):
        model = onnx.load(str(path), load_external_data=False)
        return {prop.key: json.loads(prop.value) for prop in model.metadata_props}
    extra = {METADATA_FILE: ""}
    with _torchscript_calls():
        torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def load_exported(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """An exported file (ONNX through onnxruntime, or TorchScript) as a function: input batch -> logits."""
    if not _is_torchscript(path):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})[0]
    with _torchscript_calls():
        module = torch.jit.load(str(path))

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(batch)).numpy()

    return run


def _is_torchscript(path: Path) -> bool:
    """TorchScript files are zip archives; ONNX files are protobuf."""
    return zipfile.is_zipfile(path)


def _write_onnx(module: nn.Module, example: torch.Tensor, metadata: dict[str, Any], path: Path) -> None:
    """torch.export-based ONNX (the dynamo exporter): the STFT becomes ONNX's STFT op; batch stays symbolic."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)  # torch's own
        program = torch.onnx.export(module, (example,), dynamo=True, verbose=False,
                                    input_names=[metadata["input"]], output_names=[metadata["output"]],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    program.save(str(path))


def _write_torchscript(module: nn.Module, example: torch.Tensor, metadata: dict[str, Any], path: Path) -> None:
    """A trace. Shape checks inside the models trace as constants; the parity check at other batch
    sizes shows that the batch dimension stayed general."""
    with _torchscript_calls():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


@contextmanager
def _torchscript_calls() -> Iterator[None]:
    """torch marks TorchScript deprecated; it is still what C++ and mobile runtimes load, so say it once, here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        yield
