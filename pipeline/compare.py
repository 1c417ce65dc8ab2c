"""Variants of a run side by side: each variant's student, over several student seeds, scored and plotted.

A variant is the run's config plus a few overrides (`extract.views=8`, `student.kd.enabled=false`, a
source of unlabelled audio); its student is trained once per seed, over whatever upstream stages the
variants share in the cache. The comparison scores each kept student (`model.pt`, chosen without the
evaluation split) on `evaluation.split`, as evaluate does: it says which stage is missing and how to
build it, or builds it.
It is a command of its own, not part of `evaluate`: `evaluate` is a stage, and a stage's output never
depends on what else the cache holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kdpipe import splits, stage_names, students, training
from kdpipe.devices import resolve_device
from kdpipe.errors import ConfigError
from kdpipe.frontends import build_frontend
from kdpipe.loader import BatchLoader
from kdpipe.metrics import tagging_metrics
from kdpipe.runner import Pipeline
from kdpipe.waveform_store import STORE_FILE, WaveformStore

PLOT = "comparison.png"


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`NAME: KEY=VALUE; KEY=VALUE` (no overrides: the run as configured)."""
        name, _, sets = text.partition(":")
        return cls(name.strip(), tuple(item.strip() for item in sets.split(";") if item.strip()))


@dataclass(frozen=True)
class Scores:
    variant: Variant
    seeds: tuple[int, ...]
    mAP: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.mAP))


def student_scores(variant: Variant, pipelines: Iterable[tuple[int, Pipeline]], build: bool) -> Scores:
    """The variant's student eval mAP for each (seed, pipeline of that seed)."""
    seeds, scores = [], []
    for seed, pipeline in pipelines:
        name = stage_names.student(pipeline.config.student.kd.enabled)
        try:
            folder = pipeline.output(name, build)
        except ConfigError as error:
            raise ConfigError(f"variant {variant.name!r}, seed {seed}: {error}") from None
        seeds.append(seed)
        scores.append(evaluation_map(pipeline, folder))
    return Scores(variant, tuple(seeds), tuple(scores))


def evaluation_map(pipeline: Pipeline, student_dir: Path) -> float:
    """The mAP of the student a train-student output kept, on the run's evaluation split."""
    config = pipeline.config
    store_path = pipeline.built(stage_names.PREPARE) / STORE_FILE
    store = WaveformStore.open(store_path)
    rows = splits.evaluation_rows(store, config.evaluation.split)
    device = resolve_device(config.device)
    model = students.trained_student(student_dir, config.student, len(store.classes)).to(device)
    frontend = build_frontend(model.frontend_config, store.sample_rate).to(device)
    logits = training.predict(model, frontend, BatchLoader(store_path), rows, config.evaluation.batch_size, device,
                              f"scoring on {config.evaluation.split}")
    return float(tagging_metrics(store.labels(rows), logits)["mAP"])


def write_comparison(results: list[Scores], out_dir: Path, split: str) -> Path:
    """comparison.json, comparison.md and comparison.png (each seed's mAP and the mean per variant)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps([
        {"variant": r.variant.name, "overrides": list(r.variant.overrides), "seeds": list(r.seeds),
         "mAP": list(r.mAP), "mean_mAP": r.mean} for r in results], indent=2))
    seeds = sorted({seed for r in results for seed in r.seeds})
    lines = [f"# Variants: student {split} mAP over seeds {', '.join(map(str, seeds))}", "",
             f"![{split} mAP per variant]({PLOT})", "",
             "| variant | overrides | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|" + "---|" * len(seeds) + "---|"]
    for r in results:
        by_seed = dict(zip(r.seeds, r.mAP))
        cells = " | ".join(f"{by_seed[s]:.4f}" if s in by_seed else "-" for s in seeds)
        lines.append(f"| {r.variant.name} | `{'; '.join(r.variant.overrides) or '(as configured)'}` | {cells} | "
                     f"{r.mean:.4f} |")
    (out_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    _plot(results, out_dir / PLOT, split)
    return out_dir / "comparison.md"


def _plot(results: list[Scores], path: Path, split: str) -> None:
    figure = Figure(figsize=(max(5.5, 1.4 * len(results)), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for x, r in enumerate(results):
        axes.scatter([x] * len(r.mAP), r.mAP, color="tab:blue", alpha=0.6, label="one seed" if x == 0 else None)
        axes.hlines(r.mean, x - 0.3, x + 0.3, color="black", label="mean" if x == 0 else None)
    axes.set_xticks(range(len(results)), [r.variant.name for r in results], rotation=20, ha="right")
    axes.set_ylabel(f"student {split} mAP")
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(path, dpi=120)
