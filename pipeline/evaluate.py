"""Score every model of a run on the same clips, and write what a reader compares them by.

Each model (teacher, ensemble, student) is reduced to a `ModelResult`: its
metrics and per-class AP from its logits for the evaluation split, and its
`Footprint` (size and speed). `Evaluation` holds them with what they were
computed on; `write_results` writes `metrics.json` and `per_class_ap.csv`.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from kdpipe.bench import inference_clips_per_second
from kdpipe.classes import ClassList
from kdpipe.metrics import class_metrics, lwlrap, summary
from kdpipe.models.complexity import describe

EFFICIENTAT_SECONDS = 10.0
"""EfficientAT counts MACs for 10 s clips; we also count ours at that length to compare with its points."""


@dataclass(frozen=True)
class Footprint:
    """What a model costs: its size, its MACs per clip, and how many clips per second it tags."""

    parameters: int
    macs: int
    """Per clip of the run's length."""
    macs_10s: int
    """Per 10 s clip, EfficientAT's convention."""
    clips_per_second: float
    """Frontend and model together, batched, on the device the run uses."""


def measure_footprint(model: nn.Module, infer: Callable[[torch.Tensor], torch.Tensor], clip_seconds: float,
                      clip_samples: int, batch_size: int, device: torch.device) -> Footprint:
    """Count the model's parameters and MACs and time `infer` (int16 waveforms -> logits) on random clips."""
    shapes_only = copy.deepcopy(model).to("meta")  # MACs are counted from shapes, without computing
    run_length, efficientat_length = describe(shapes_only, clip_seconds), describe(shapes_only, EFFICIENTAT_SECONDS)
    return Footprint(run_length["parameters"], run_length["macs"], efficientat_length["macs"],
                     inference_clips_per_second(infer, clip_samples, batch_size, device))


def combined_footprint(parts: list[Footprint]) -> Footprint:
    """An ensemble runs every member on each clip: sizes and MACs add up, and so do seconds per clip."""
    return Footprint(sum(p.parameters for p in parts), sum(p.macs for p in parts), sum(p.macs_10s for p in parts),
                     1.0 / sum(1.0 / p.clips_per_second for p in parts))


@dataclass
class ModelResult:
    id: str
    """Unique and file-safe: the model's column in per_class_ap.csv (teacher_<name>, ensemble, student_kd, ...)."""
    label: str
    """How tables name it."""
    role: Literal["teacher", "ensemble", "student"]
    arch: str
    clips: int
    """Evaluated clips: those the model has logits for (an imported teacher may lack some)."""
    metrics: dict[str, float]
    """mAP, mAUC, d_prime, lwlrap."""
    per_class_ap: np.ndarray
    footprint: Footprint | None = None
    """None where there is no model to measure (imported logits)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """A trained model's metrics.jsonl, one record per epoch (validation figures flattened, see read_history)."""
    kept: str = ""
    """Which epoch of its training the model is, and why (kept.json's reason); "" when not trained here."""


def score(model_id: str, label: str, role: Literal["teacher", "ensemble", "student"], arch: str,
          targets: np.ndarray, logits: np.ndarray) -> ModelResult:
    """Metrics and per-class AP of one model's logits, over the clips it has logits for."""
    have = np.isfinite(logits).all(axis=1)
    targets, logits = targets[have], logits[have].astype(np.float32)
    ap, auc = class_metrics(targets, logits)
    metrics = {**summary(ap, auc), "lwlrap": lwlrap(targets, logits)}
    return ModelResult(model_id, label, role, arch, int(have.sum()), metrics, ap)


def read_history(metrics_jsonl: Path, member: str | None = None) -> list[dict[str, Any]]:
    """A trained stage's per-epoch records: epoch, lr, train_loss, and `val_mAP` where a validation split
    was measured.

    With `member`, a multi-representation group's records carry that member's own validation mAP.
    """
    history = []
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        validation = record.pop("validation", None)
        if validation is not None:
            record["val_mAP"] = (validation["members"][member] if member else validation)["mAP"]
        history.append(record)
    return history


@dataclass
class Evaluation:
    """Every model's results and what they were computed on."""

    split: str
    classes: ClassList
    positives: np.ndarray
    """Positive clips per class in the split."""
    clips: int
    clip_seconds: float
    data: list[str]
    """The run's data sources."""
    device: str
    """Where sizes were timed."""
    models: list[ModelResult]

    def summary(self) -> dict[str, Any]:
        """metrics.json: the context, and each model's metrics and footprint (no per-class arrays)."""
        return {
            "split": self.split, "clips": self.clips, "classes": len(self.classes),
            "clip_seconds": self.clip_seconds, "data": self.data, "device": self.device,
            "models": [{"id": m.id, "label": m.label, "role": m.role, "arch": m.arch, "clips": m.clips,
                        **m.metrics, **(asdict(m.footprint) if m.footprint else {}),
                        **({"kept": m.kept} if m.kept else {})} for m in self.models],
        }


def write_results(evaluation: Evaluation, out_dir: Path) -> None:
    """metrics.json and per_class_ap.csv (one row per class; AP empty where the class has no positives)."""
    (out_dir / "metrics.json").write_text(json.dumps(evaluation.summary(), indent=2))
    with open(out_dir / "per_class_ap.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class_index", "mid", "class_name", "positives", *(f"ap_{m.id}" for m in evaluation.models)])
        for c, (mid, name) in enumerate(zip(evaluation.classes.mids, evaluation.classes.names)):
            aps = ("" if math.isnan(m.per_class_ap[c]) else f"{m.per_class_ap[c]:.6f}" for m in evaluation.models)
            writer.writerow([c, mid, name, int(evaluation.positives[c]), *aps])
