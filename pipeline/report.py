"""The evaluation report: report.md with PNG plots beside it, from an `Evaluation`.

Plots: each student's per-class AP against the teacher ensemble's; students'
mAP against MACs and parameters with EfficientAT's published models for
reference; students' training curves (validation mAP where measured). The report
says which epoch of its training each model is and why, and that no training
step read the split it is scored on. Figures are drawn on matplotlib's Agg
canvas (no display, no pyplot state).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdpipe.evaluate import EFFICIENTAT_SECONDS, Evaluation, ModelResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# EfficientAT's published AudioSet models (github.com/fschmid56/EfficientAT README at a425fdc, table of
# pre-trained models): name, parameters (M),
# MACs per 10 s clip (G), AudioSet eval mAP. All ImageNet-pretrained; the best run, not an average.
EFFICIENTAT_PUBLISHED: tuple[tuple[str, float, float, float], ...] = (
    ("mn04", 0.983, 0.11, 0.432),
    ("mn05", 1.43, 0.16, 0.443),
    ("mn10", 4.88, 0.54, 0.471),
    ("mn20", 17.91, 2.06, 0.478),
    ("mn30", 39.09, 4.55, 0.482),
    ("mn40", 68.43, 8.03, 0.484),
    ("dymn04", 1.97, 0.12, 0.450),
    ("dymn10", 10.57, 0.58, 0.477),
    ("dymn20", 40.02, 2.2, 0.491),
)

PER_CLASS_PLOT = "per_class_ap.png"
COMPLEXITY_PLOT = "map_vs_complexity.png"
CURVES_PLOT = "training_curves.png"


def write_report(evaluation: Evaluation, out_dir: Path) -> Path:
    """Write the plots that have something to show and report.md linking them; returns report.md."""
    students = [m for m in evaluation.models if m.role == "student"]
    ensemble = next((m for m in evaluation.models if m.role == "ensemble"), None)
    sections = [_header(evaluation), _table(evaluation)]
    if ensemble is not None and students:
        _plot_per_class(out_dir / PER_CLASS_PLOT, ensemble, students)
        sections.append(f"## Per-class AP: students against the teacher ensemble\n\n![per-class AP]({PER_CLASS_PLOT})"
                        "\n\nOne point per class with positives; above the diagonal the student tags the class "
                        "better than its teachers.")
    measured = [m for m in students if m.footprint is not None]
    if measured:
        _plot_complexity(out_dir / COMPLEXITY_PLOT, measured)
        sections.append(f"## mAP against MACs and parameters\n\n![mAP against complexity]({COMPLEXITY_PLOT})\n\n"
                        f"Our students' mAP is measured on this run's data ({evaluation.split} split); EfficientAT's "
                        "points are published AudioSet eval mAPs (models trained on AudioSet's 2 M clips), drawn "
                        "for reference: compare sizes and trends, not the heights. MACs are per "
                        f"{EFFICIENTAT_SECONDS:g} s clip for both.")
    kept = [m for m in evaluation.models if m.kept]
    if kept:
        sections.append("## Which checkpoint each model is\n\n" + "\n".join(f"- **{m.label}**: {m.kept}" for m in kept)
                        + f"\n\nEvery checkpoint was kept without the {evaluation.split} split: training reads "
                        "only its train clips and, to choose an epoch or a member, its validation split "
                        "(kdpipe.splits); no training step read a clip scored here.")
    trained = [m for m in students if m.history]
    if trained:
        _plot_curves(out_dir / CURVES_PLOT, trained)
        sections.append(f"## Training curves\n\n![training curves]({CURVES_PLOT})\n\n"
                        "Validation mAP (where the run has a validation split) and training loss after each "
                        f"epoch, from each student's metrics.jsonl; never the {evaluation.split} split.")
    path = out_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


def _header(evaluation: Evaluation) -> str:
    sources = ", ".join(f"`{source}`" for source in evaluation.data) or "none"
    return (f"# kdpipe evaluation report\n\nComputed on the **{evaluation.split}** split of the run's prepared "
            f"data ({sources}): {evaluation.clips} clips of {evaluation.clip_seconds:g} s, "
            f"{len(evaluation.classes)} classes. Teachers and the ensemble are scored from their stored logits, "
            f"students from their kept weights run over the same clips. MACs are per "
            f"{evaluation.clip_seconds:g} s clip; "
            f"clips/s is a batched forward pass, frontend included, on {evaluation.device}.\n\n"
            "All numbers: [metrics.json](metrics.json); AP of every class and model: "
            "[per_class_ap.csv](per_class_ap.csv).")


def _table(evaluation: Evaluation) -> str:
    rows = ["| model | arch | clips | mAP | mAUC | d-prime | lwlrap | parameters | MACs | clips/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in evaluation.models:
        metrics = " | ".join(f"{m.metrics[k]:.4f}" for k in ("mAP", "mAUC", "d_prime", "lwlrap"))
        f = m.footprint
        size = (f"{format_count(f.parameters)} | {format_count(f.macs)} | {f.clips_per_second:.1f}" if f
                else "n/a | n/a | n/a")
        rows.append(f"| {m.label} | {m.arch} | {m.clips} | {metrics} | {size} |")
    return "\n".join(rows)


def _new_figure(columns: int) -> Figure:
    # matplotlib is imported when a report is drawn, not when the stages are built (0.5 s at every kdpipe start)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * columns, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _plot_per_class(path: Path, ensemble: ModelResult, students: list[ModelResult]) -> None:
    axes = _new_figure(1).subplots()
    for student, marker in zip(students, "os^Dv<>"):
        defined = ~np.isnan(ensemble.per_class_ap) & ~np.isnan(student.per_class_ap)
        axes.scatter(ensemble.per_class_ap[defined], student.per_class_ap[defined], marker=marker, alpha=0.6,
                     label=f"{student.label} (mAP {student.metrics['mAP']:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="equal AP")
    axes.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel=f"{ensemble.label} AP", ylabel="student AP",
             title="Per-class AP")
    axes.legend(loc="lower right", fontsize="small")
    axes.figure.savefig(path, dpi=120)


def _plot_complexity(path: Path, students: list[ModelResult]) -> None:
    figure = _new_figure(2)
    # (Footprint attribute, its unit, the published table's column, axis label)
    panels = (("macs_10s", 1e9, 2, f"MACs per {EFFICIENTAT_SECONDS:g} s clip (G)"),
              ("parameters", 1e6, 1, "parameters (M)"))
    for axes, (attribute, unit, column, axis_label) in zip(figure.subplots(1, 2), panels):
        for row in EFFICIENTAT_PUBLISHED:
            axes.scatter(row[column], row[3], color="grey", marker="x")
            axes.annotate(row[0], (row[column], row[3]), fontsize="x-small", color="grey", xytext=(3, 3),
                          textcoords="offset points")
        axes.scatter([], [], color="grey", marker="x", label="EfficientAT on AudioSet (published)")
        for student in students:
            x, y = getattr(student.footprint, attribute) / unit, student.metrics["mAP"]
            axes.scatter([x], [y], s=60, label=f"{student.label} ({student.arch}), this run")
        axes.set(xscale="log", xlabel=axis_label, ylabel="mAP", title=f"mAP against {axis_label.split()[0]}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small", loc="best")
    figure.savefig(path, dpi=120)


def _plot_curves(path: Path, students: list[ModelResult]) -> None:
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(2)
    map_axes, loss_axes = figure.subplots(1, 2)
    for student in students:
        epochs = [record["epoch"] for record in student.history]
        measured = [(record["epoch"], record["val_mAP"]) for record in student.history if "val_mAP" in record]
        if measured:
            map_axes.plot(*zip(*measured), marker=".", label=student.label)
        loss_axes.plot(epochs, [record["train_loss"] for record in student.history], marker=".", label=student.label)
    if not map_axes.lines:
        map_axes.text(0.5, 0.5, "no validation split:\nnothing measured per epoch", ha="center", va="center",
                      transform=map_axes.transAxes)
    map_axes.set(xlabel="epoch", ylabel="validation mAP", title="Validation mAP per epoch")
    loss_axes.set(xlabel="epoch", ylabel="train loss", title="Training loss per epoch")
    loss_axes.ticklabel_format(axis="y", useOffset=False)
    for axes in (map_axes, loss_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def format_count(value: float) -> str:
    """A parameter or MAC count in readable units (k, M, G)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"
