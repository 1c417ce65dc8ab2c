"""Training pieces shared by every trained stage: schedule, mixup, prediction, the epoch loop.

A stage supplies the model, its frontend and a loss over (logits, rows, mixup);
this module runs epochs from the waveform store, evaluates mAP on the eval
split after each one, and keeps `best.pt` / `last.pt` plain state dicts and a
`metrics.jsonl` beside them.
"""

from __future__ import annotations

import json
import math
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
from kdpipe.stage import SINGLE, Ranks
from kdpipe.errors import KdpipeError
from kdpipe.frontends import int16_to_float
from kdpipe.loader import BatchLoader, class_balanced_weights, sequential_batches, weighted_batches
from kdpipe.metrics import tagging_metrics
from kdpipe.models.windowing import clip_forward
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


def train_and_eval_rows(store: WaveformStore, eval_split: str, stage: str, unlabelled: bool = False
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The decoded clips of the 'train' split and of the evaluation split; both must exist.

    Train clips without labels are left out unless `unlabelled` (they teach through teacher targets only).
    """
    train_rows, eval_rows = store.rows("train"), store.rows(eval_split)
    if not unlabelled:
        train_rows = train_rows[store.labelled()[train_rows]]
    if len(train_rows) == 0 or len(eval_rows) == 0:
        raise KdpipeError(f"{stage} needs clips in the 'train' and '{eval_split}' splits; "
                          f"the store has {len(train_rows)} and {len(eval_rows)}")
    return train_rows, eval_rows


def weighted_epochs(train_rows: np.ndarray, weights: np.ndarray, clips_per_epoch: int, batch_size: int,
                    seed: int) -> Callable[[int], list[np.ndarray]]:
    """Each epoch's batches, drawn afresh from (seed, epoch): a resumed run draws the same ones."""

    def epoch_batches(epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, epoch])
        return weighted_batches(train_rows, weights, clips_per_epoch, batch_size, rng)

    return epoch_batches


def epoch_plan(store: WaveformStore, train_rows: np.ndarray, settings: TrainingConfig, seed: int,
               teacher_probabilities: np.ndarray | None = None) -> Callable[[int], list[np.ndarray]]:
    """A training section's epochs: `epoch_samples` clips each (0 = as many as there are training clips),
    drawn with EfficientAT's class-balanced weights or uniformly.

    An unlabelled clip is weighted by the teacher's probabilities in place of its labels
    (`teacher_probabilities`, (N, C) by store row): the classes the teacher hears in it.
    """
    labels = store.column("labels")[train_rows].astype(np.float64)
    unlabelled = ~store.labelled()[train_rows]
    if unlabelled.any():
        assert teacher_probabilities is not None, "unlabelled clips are drawn by their teacher probabilities"
        labels[unlabelled] = teacher_probabilities[train_rows[unlabelled]]
    weights = class_balanced_weights(labels) if settings.balanced_sampling else np.ones(len(train_rows))
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
    loss = loss_fn(logits.float(), rows, labels[rows], mixup)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def fit(model: nn.Module, frontend: nn.Module, store_path: Path, epoch_batches: Callable[[int], list[np.ndarray]],
        eval_rows: np.ndarray, loss_fn: LossFn, settings: FitSettings, out_dir: Path,
        device: torch.device, ranks: Ranks = SINGLE, inputs: EpochInputs | None = None) -> dict:
    """Train for `settings.epochs`, evaluating after each (on clean clips); returns the best epoch's metrics.

    `inputs` changes what each epoch hears (consistent teaching: that epoch's view of every clip).

    With several ranks, each trains on its share of every epoch's batches under DDP;
    rank 0 alone evaluates and writes, and the others wait for it at each epoch's end.
    """
    store = WaveformStore.open(store_path)
    labels = torch.from_numpy(store.column("labels")).to(device, dtype=torch.float32)
    eval_targets = store.column("labels")[eval_rows].astype(bool)
    members = tuple(getattr(model, "member_names", ()))
    max_frames = getattr(model, "max_frames", None)  # read before wrapping: DDP and compile hide it
    # NHWC: the depthwise and 1x1 convolutions of CNNs run faster in it (mn10 training 1.3x on a CPU).
    model.to(device, memory_format=torch.channels_last)
    frontend.to(device)
    trained = distributed.wrap(model, ranks, device)
    stepped = torch.compile(trained) if settings.compile else trained
    bf16 = settings.bf16(device)
    loader = BatchLoader(store_path, num_workers=settings.num_workers, pin_memory=device.type == "cuda")
    optimizer_cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_multiplier(
        e, settings.warmup_epochs, settings.rampdown_start, settings.rampdown_epochs, settings.last_lr_factor))
    rng = np.random.default_rng([settings.seed, 1, ranks.rank])
    metrics_file = out_dir / "metrics.jsonl"
    distributed.barrier(ranks)  # rank 0 has prepared the output folder
    start, best = _resume(out_dir, model, optimizer, schedule, rng, ranks)
    if ranks.is_main:
        lines = metrics_file.read_text().splitlines()[:start] if metrics_file.exists() else []
        metrics_file.write_text("".join(line + "\n" for line in lines))  # drop lines written after the last save
        if start:
            console.info(f"resuming after epoch {start} of {settings.epochs}")
    for epoch in range(start, settings.epochs):
        started = time.time()
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
        scores = predict(model, frontend, loader, eval_rows, settings.eval_batch_size, device, "evaluating")
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": total / max(count, 1),
                  **evaluation_record(eval_targets, scores, members), "seconds": round(time.time() - started, 2)}
        with open(metrics_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        torch.save(model.state_dict(), out_dir / "last.pt")
        if record["mAP"] > best["mAP"]:
            best = record
            torch.save(model.state_dict(), out_dir / "best.pt")
        _save_resume_state(out_dir, epoch + 1, model, optimizer, schedule, rng, best, ranks)
        console.info(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}, eval mAP {record['mAP']:.4f}, "
                     f"mAUC {record['mAUC']:.4f}")
    distributed.barrier(ranks)
    if ranks.is_main:
        (out_dir / RESUME).unlink(missing_ok=True)
    return best


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
        return 0, {"mAP": -1.0}
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
