"""Training pieces shared by every trained stage: schedule, sampling, mixup, prediction, the epoch loop.

A stage supplies the model, its frontend, its train and validation rows (kdpipe.splits) and a
loss over (logits, rows, mixup); this module runs epochs from the waveform store, measures the
validation split after each one (when there is one), and writes plain state dicts: `last.pt`,
and `model.pt`, the checkpoint the stage keeps (`keep: last`, or the epoch with the best
validation mAP under `keep: best`), with `kept.json` saying which epoch that is and why, and
`metrics.jsonl`, one record per epoch. No clip of the evaluation split is ever read here.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe import atomic, console, distributed
from kdpipe.devices import resolve_precision
from kdpipe.distributed import SINGLE, Ranks
from kdpipe.errors import KdpipeError
from kdpipe.frontends import int16_to_float
from kdpipe.loader import BatchLoader, class_balanced_weights, class_weights, sequential_batches, weighted_batches
from kdpipe.metrics import tagging_metrics
from kdpipe.models.windowing import clip_forward
from kdpipe.splits import TrainingSplits
from kdpipe.waveform_store import WaveformStore

if TYPE_CHECKING:
    from kdpipe.config import TrainingConfig


def lr_multiplier(epoch: int, warmup_epochs: int, rampdown_start: int, rampdown_epochs: int,
                  last_value: float) -> float:
    """EfficientAT's schedule: exponential warm-up, plateau, linear decay to `last_value`, then flat."""
    if epoch < warmup_epochs:
        progress = max(epoch, 0.5) / warmup_epochs
        return math.exp(-5.0 * (1.0 - progress) ** 2)
    if epoch < rampdown_start:
        return 1.0
    progress = min((epoch - rampdown_start) / rampdown_epochs, 1.0)
    return 1.0 - progress * (1.0 - last_value)


Features = torch.Tensor | tuple[torch.Tensor, ...]
"""A frontend's output: one tensor, or one per representation (multi-representation students)."""


@dataclass(frozen=True)
class Mixup:
    """Per-sample mixing weights (the original clip dominates) and the partner permutation."""

    lam: torch.Tensor  # (B,)
    perm: torch.Tensor  # (B,)

    @classmethod
    def draw(cls, batch: int, alpha: float, rng: np.random.Generator, device: torch.device) -> Mixup:
        lam = rng.beta(alpha, alpha, size=batch).astype(np.float32)
        lam = np.maximum(lam, 1.0 - lam)
        return cls(torch.from_numpy(lam).to(device), torch.from_numpy(rng.permutation(batch)).to(device))

    def mix(self, x: Features) -> Features:
        """Mix a batch along dim 0 (features or targets; each of a tuple of representations alike)."""
        if isinstance(x, tuple):
            return tuple(self.mix(part) for part in x)
        lam = self.lam.view(-1, *([1] * (x.dim() - 1)))
        return lam * x + (1.0 - lam) * x[self.perm]


@torch.inference_mode()
def predict(model: nn.Module, frontend: nn.Module, loader: BatchLoader, rows: np.ndarray, batch_size: int,
            device: torch.device, description: str = "predicting") -> np.ndarray:
    """Logits (len(rows), classes) in the order of `rows` ((len(rows), members, classes) for a group).

    The model is put in channels-last layout, as training keeps it, so a saved model scores
    exactly what training measured (layouts pick different kernels, which round differently).
    """
    model.eval().to(memory_format=torch.channels_last)
    frontend.eval()
    batches = sequential_batches(rows, batch_size)
    outputs: np.ndarray | None = None
    position = {row: i for i, row in enumerate(rows.tolist())}
    for waves, batch_rows in console.track(loader(batches), len(batches), description):
        features = frontend(int16_to_float(waves.to(device, non_blocking=True)))
        logits = clip_forward(model, features).float().cpu().numpy()
        if outputs is None:
            outputs = np.empty((len(rows), *logits.shape[1:]), dtype=np.float32)
        outputs[[position[r] for r in batch_rows.tolist()]] = logits
    assert outputs is not None, "predict needs at least one row"
    return outputs


def evaluation_record(targets: np.ndarray, scores: np.ndarray, members: tuple[str, ...] = ()) -> dict:
    """Tagging metrics of the scores; for a group (scores N x members x C), per member, headed by the best."""
    if scores.ndim == 2:
        return tagging_metrics(targets, scores)
    per_member = {name: tagging_metrics(targets, scores[:, k]) for k, name in enumerate(members)}
    best = max(per_member, key=lambda name: per_member[name]["mAP"])
    return {**per_member[best], "best_member": best, "members": per_member}


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Mixup | None], torch.Tensor]
"""(logits, store rows on device, labels (B, C) float on device, mixup or None) -> scalar loss."""


class EpochInputs(Protocol):
    """What a training run hears each epoch, when that is more than the clean clips (kdpipe.distill)."""

    def start_epoch(self, epoch: int) -> None: ...

    def augment(self, waves: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """float waveforms of store `rows` -> what the model hears this epoch, on the same device."""
        ...


def label_loss(logits: torch.Tensor, _rows: torch.Tensor, labels: torch.Tensor, mixup: Mixup | None) -> torch.Tensor:
    """BCE against the labels, mixed like the inputs under mixup."""
    return F.binary_cross_entropy_with_logits(logits, mixup.mix(labels) if mixup else labels)


def weighted_epochs(train_rows: np.ndarray, weights: np.ndarray, clips_per_epoch: int, batch_size: int,
                    seed: int) -> Callable[[int], list[np.ndarray]]:
    """Each epoch's batches, drawn afresh from (seed, epoch): a resumed run draws the same ones."""

    def epoch_batches(epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, epoch])
        return weighted_batches(train_rows, weights, clips_per_epoch, batch_size, rng)

    return epoch_batches


HEARD_ROWS = 65536
"""Unlabelled rows whose confident classes are read at a time."""


def sampling_weights(store: WaveformStore, train_rows: np.ndarray, balanced: bool,
                     heard: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Each train row's weight in the draw: EfficientAT's class-balanced weight, or 1 without balancing.

    Unlabelled clips (KD students only) are weighted by `heard(rows)`, (len(rows), C) bool: the classes
    the teachers confidently hear in each (kdpipe.distill.confident_classes), at the per-class weights
    of the labelled clips alone. So an unlabelled clip weighs what a labelled clip of the same classes
    weighs, one the teachers hear nothing in is never drawn, and the labelled clips keep exactly the
    weights they have without unlabelled ones.
    """
    if not balanced:
        return np.ones(len(train_rows))
    unlabelled = ~store.labelled()[train_rows]
    labels = store.column("labels")
    per_class = class_weights(labels, train_rows[~unlabelled])
    weights = class_balanced_weights(labels, train_rows, per_class)
    if unlabelled.any():
        assert heard is not None, "unlabelled clips are drawn by the classes the teachers hear in them"
        positions = np.flatnonzero(unlabelled)
        for start in range(0, len(positions), HEARD_ROWS):  # (HEARD_ROWS, C) at a time, not (unlabelled, C)
            block = positions[start:start + HEARD_ROWS]
            weights[block] = class_balanced_weights(heard(train_rows[block]), None, per_class)
    return weights


def epoch_plan(store: WaveformStore, train_rows: np.ndarray, settings: TrainingConfig, seed: int,
               heard: Callable[[np.ndarray], np.ndarray] | None = None) -> Callable[[int], list[np.ndarray]]:
    """A training section's epochs: `epoch_samples` clips each (0 = one draw per train clip), drawn by
    `sampling_weights`.

    An epoch stays `epoch_samples` draws when unlabelled clips join: they take their share of the weight
    from the labelled clips rather than adding draws (EfficientAT's fixed epoch); with `epoch_samples: 0`
    an epoch is one draw per train clip, labelled or not, so they add draws.
    """
    weights = sampling_weights(store, train_rows, settings.balanced_sampling, heard)
    return weighted_epochs(train_rows, weights, settings.epoch_samples or len(train_rows), settings.batch_size,
                           seed)


@dataclass(frozen=True)
class FitSettings:
    epochs: int
    lr: float
    optimizer: str
    weight_decay: float
    warmup_epochs: int
    rampdown_start: int
    rampdown_epochs: int
    last_lr_factor: float
    mixup_alpha: float
    eval_batch_size: int
    num_workers: int
    seed: int
    precision: str = "auto"
    compile: bool = False
    keep: str = "last"

    @classmethod
    def from_config(cls, settings: TrainingConfig, eval_batch_size: int, seed: int) -> FitSettings:
        """A training section of the config (student or teacher_training) as `fit` takes it: here, in code the
        trained stages' keys hash, not in the schema."""
        return cls(
            epochs=settings.epochs, lr=settings.lr, optimizer=settings.optimizer, weight_decay=settings.weight_decay,
            warmup_epochs=settings.warmup_epochs, rampdown_start=settings.rampdown_start,
            rampdown_epochs=settings.rampdown_epochs, last_lr_factor=settings.last_lr_factor,
            mixup_alpha=settings.mixup_alpha, eval_batch_size=eval_batch_size, num_workers=settings.num_workers,
            seed=seed, precision=settings.precision, compile=settings.compile, keep=settings.keep)

    def bf16(self, device: torch.device) -> bool:
        """bf16 autocast for the model's forward (kdpipe.devices says what `auto` means)."""
        return resolve_precision(self.precision, device) == "bf16"


def train_step(model: nn.Module, frontend: nn.Module, optimizer: torch.optim.Optimizer, waves: torch.Tensor,
               rows: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn, mixup_alpha: float,
               rng: np.random.Generator, bf16: bool, max_frames: int | None = None,
               inputs: EpochInputs | None = None) -> torch.Tensor:
    """One optimisation step on an int16 batch; returns the loss as a device tensor (no host sync).

    Features and mixup run on the model's device in fp32; the model runs under bf16 autocast
    when asked, and the loss is computed in fp32 on its logits.
    """
    device = labels.device
    waves = int16_to_float(waves.to(device, non_blocking=True))
    if inputs is not None:
        waves = inputs.augment(waves, rows.numpy())
    rows = rows.to(device, non_blocking=True)
    features = frontend(waves)
    mixup = Mixup.draw(len(rows), mixup_alpha, rng, device) if mixup_alpha else None
    if mixup is not None:
        features = mixup.mix(features)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = clip_forward(model, features, max_frames)  # windows for clips longer than the model takes
    loss = loss_fn(logits.float(), rows, labels[rows].float(), mixup)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def labels_on_device(store: WaveformStore, validation_rows: np.ndarray, device: torch.device
                     ) -> tuple[torch.Tensor, np.ndarray]:
    """Every clip's labels on the device as uint8, made float a batch at a time (AudioSet's (2 M, 527): 1.05 GB,
    4.2 as float32), and the validation rows' as bool on the host; on a GPU the host keeps no other copy."""
    label_matrix = store.column("labels")
    return torch.from_numpy(label_matrix).to(device), label_matrix[validation_rows].astype(bool)


MODEL, LAST, KEPT, METRICS = "model.pt", "last.pt", "kept.json", "metrics.jsonl"
OUTPUTS = (MODEL, LAST, KEPT, METRICS)
"""What `fit` leaves in a trained stage's folder (module docstring)."""


def fit(model: nn.Module, frontend: nn.Module, store_path: Path, epoch_batches: Callable[[int], list[np.ndarray]],
        splits: TrainingSplits, loss_fn: LossFn, settings: FitSettings, out_dir: Path,
        device: torch.device, ranks: Ranks = SINGLE, inputs: EpochInputs | None = None) -> dict:
    """Train for `settings.epochs`, measuring the validation split after each (on clean clips, when there is
    one); returns the kept epoch's record (`kept.json`'s content).

    `inputs` changes what each epoch hears (consistent teaching: that epoch's view of every clip).

    With several ranks, each trains on its share of every epoch's batches under DDP;
    rank 0 alone measures and writes, and the others wait for it at each epoch's end.
    """
    assert settings.keep == "last" or len(splits.validation), "keep: best needs a validation split (splits.py)"
    store = WaveformStore.open(store_path)
    validation_rows = splits.validation
    labels, validation_targets = labels_on_device(store, validation_rows, device)
    members = tuple(getattr(model, "member_names", ()))
    max_frames = getattr(model, "max_frames", None)  # read before wrapping: DDP and compile hide it
    # NHWC: the depthwise and 1x1 convolutions of CNNs run faster in it (mn10 training 1.3x on a CPU).
    model.to(device, memory_format=torch.channels_last)
    frontend.to(device)
    bf16 = settings.bf16(device)
    loader = BatchLoader(store_path, num_workers=settings.num_workers, pin_memory=device.type == "cuda")
    optimizer_cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for all parameters instead of a loop over them (a MobileNet's ~200 small tensors:
    # 12.9 -> 1.8 ms per step for a width-0.4 student on a 2-core CPU)
    optimizer = optimizer_cls(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                              fused=device.type in ("cpu", "cuda"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_multiplier(
        e, settings.warmup_epochs, settings.rampdown_start, settings.rampdown_epochs, settings.last_lr_factor))
    rng = np.random.default_rng([settings.seed, 1, ranks.rank])
    metrics_file = out_dir / METRICS
    distributed.barrier(ranks)  # rank 0 has prepared the output folder
    start, best = _resume(out_dir, model, optimizer, schedule, rng, ranks)
    if ranks.is_main:
        lines = metrics_file.read_text().splitlines()[:start] if metrics_file.exists() else []
        metrics_file.write_text("".join(line + "\n" for line in lines))  # drop lines written after the last save
        if start:
            console.info(f"resuming after epoch {start} of {settings.epochs}")
    for epoch in range(start, settings.epochs):
        if epoch == start or ranks.distributed:
            # Under DDP a fresh wrapper each epoch: DDP regroups its gradient buckets after its first step, and
            # where a gradient sits in a bucket sets the order the ranks' values are summed in, so without this a
            # resumed run would drift from an uninterrupted one in the last bits.
            trained = distributed.wrap(model, ranks, device)
            stepped = torch.compile(trained) if settings.compile else trained
        started = time.time()
        scheduled = getattr(model, "update_params", None)  # EfficientAT's per-epoch hook: DyMN's temperature
        temperature = scheduled(epoch) if scheduled is not None else None
        trained.train()
        frontend.train()
        batches = distributed.shard(epoch_batches(epoch), ranks)
        if inputs is not None:
            inputs.start_epoch(epoch)
        summed, count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for waves, rows in console.track(loader(batches), len(batches), f"epoch {epoch + 1}/{settings.epochs}"):
            loss = train_step(stepped, frontend, optimizer, waves, rows, labels, loss_fn, settings.mixup_alpha,
                              rng, bf16, max_frames, inputs)
            summed += loss * len(rows)
            count += len(rows)
        schedule.step()
        total, count = _sum_over_ranks((summed.item(), count), ranks)
        if not ranks.is_main:
            _save_resume_state(out_dir, epoch + 1, model, optimizer, schedule, rng, best, ranks)
            continue
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": total / max(count, 1)}
        if temperature is not None:
            record["temperature"] = temperature
        message = f"epoch {epoch + 1}: loss {record['train_loss']:.4f}"
        if len(validation_rows):
            scores = predict(model, frontend, loader, validation_rows, settings.eval_batch_size, device,
                             "validating")
            record["validation"] = evaluation_record(validation_targets, scores, members)
            message += f", validation mAP {record['validation']['mAP']:.4f}"
        record["seconds"] = round(time.time() - started, 2)
        with open(metrics_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        _save_weights(model, out_dir / LAST)
        if settings.keep == "best" and record["validation"]["mAP"] > best.get("validation", {"mAP": -1.0})["mAP"]:
            best = record
            _save_weights(model, out_dir / MODEL)
        _save_resume_state(out_dir, epoch + 1, model, optimizer, schedule, rng, best, ranks)
        console.info(message)
    distributed.barrier(ranks)
    if not ranks.is_main:
        return {}
    kept = _keep(out_dir, settings, best, splits.validation_name)
    (out_dir / RESUME).unlink(missing_ok=True)
    return kept


def _save_weights(model: nn.Module, path: Path) -> None:
    """A plain state dict, written atomically (a new file each time: `model.pt` may be a link to `last.pt`)."""
    state = model.state_dict()
    atomic.write(path, lambda tmp: torch.save(state, tmp))


def _keep(out_dir: Path, settings: FitSettings, best: dict, validation_name: str) -> dict:
    """Settle `model.pt` and write `kept.json`: which epoch the stage keeps, and why."""
    records = [json.loads(line) for line in (out_dir / METRICS).read_text().splitlines()]
    if settings.keep == "best":
        record = best
        reason = (f"epoch {record['epoch']} of {settings.epochs}: the best validation mAP "
                  f"({record['validation']['mAP']:.4f}) on {validation_name} (keep: best)")
    else:
        record = records[-1]
        (out_dir / MODEL).unlink(missing_ok=True)
        os.link(out_dir / LAST, out_dir / MODEL)  # the same bytes, once on disk
        reason = f"the last epoch, {record['epoch']} of {settings.epochs} (keep: last)"
    kept = {"keep": settings.keep, "epoch": record["epoch"], "reason": reason, "weights": MODEL,
            "validation": validation_name or None,
            **({"validation_metrics": record["validation"]} if "validation" in record else {})}
    atomic.write_text(out_dir / KEPT, json.dumps(kept, indent=2))
    console.info(f"kept {reason}")
    return kept


def at_kept_epoch(model: nn.Module, out_dir: Path) -> nn.Module:
    """Set a model's per-epoch state (`update_params`: DyMN's temperature) to the epoch kept in `out_dir`, when
    that is a training's output; weights from elsewhere keep what loading set (a DyMN: its schedule's end)."""
    scheduled = getattr(model, "update_params", None)
    if scheduled is not None and (out_dir / KEPT).is_file():
        scheduled(read_kept(out_dir)["epoch"] - 1)
    return model


def read_kept(out_dir: Path) -> dict:
    """A trained stage's `kept.json`: the kept epoch, why, and its validation metrics (when measured)."""
    return json.loads((out_dir / KEPT).read_text())


def _sum_over_ranks(values: tuple[float, ...], ranks: Ranks) -> tuple[float, ...]:
    return tuple(sum(column) for column in zip(*distributed.gather(values, ranks)))


RESUME = "resume.pt"


def _save_resume_state(out_dir: Path, epochs_done: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                       schedule: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator, best: dict,
                       ranks: Ranks) -> None:
    """Everything the next epoch depends on, written atomically: a run killed anywhere resumes exactly.

    Model and optimizer are identical on every rank; the random states differ, so each
    rank's are gathered and rank 0 writes them all.
    """
    rng_states = distributed.gather({
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "mixup_rng": rng.bit_generator.state,
    }, ranks)
    if not ranks.is_main:
        return
    state = {
        "epochs_done": epochs_done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(), "ranks": rng_states, "best": best,
    }
    atomic.write(out_dir / RESUME, lambda tmp: torch.save(state, tmp))


def _resume(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            schedule: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator,
            ranks: Ranks) -> tuple[int, dict]:
    """Restore a saved state if the folder has one; returns the epochs already done and the best so far."""
    path = out_dir / RESUME
    if not path.is_file():
        return 0, {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    if len(state["ranks"]) != ranks.world:
        raise KdpipeError(f"{path} was saved by {len(state['ranks'])} processes; resume it with as many "
                          f"(this run has {ranks.world}), or rerun with --force")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    mine = state["ranks"][ranks.rank]
    torch.set_rng_state(mine["torch_rng"])
    if mine["cuda_rng"]:
        torch.cuda.set_rng_state_all(mine["cuda_rng"])
    rng.bit_generator.state = mine["mixup_rng"]
    return int(state["epochs_done"]), state["best"]
