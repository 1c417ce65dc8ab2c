"""The recipe of the augmented views: one value, built once from the config and recorded in every logits store.

Consistent teaching (CED) only works if the student hears exactly what the teachers heard. The
views a store holds are fixed by their count, their seed and their augmentation (kdpipe.views draws
and applies them), so extract-teachers records that `ViewPlan` in each `logits.zarr` and in
`teachers.zarr`, and a student reads the plan from the store it learns from and refuses a config
that asks for another. This module is plain data (no torch), so stores can record and compare plans
without loading a model stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdpipe.config import ExtractConfig


@dataclass(frozen=True)
class ViewAugment:
    """What a view may do to a clip; 0 (or p = 0) switches a part off.

    Defaults follow CED and EfficientAT where they have a waveform-domain
    equivalent: CED rolls by up to half the clip (torch_audiomentations' Shift,
    min/max_shift ±0.5 as a fraction of the clip: ±5 s of a 10 s clip);
    EfficientAT's fine-tuning recipes change gain by up to ±12 dB, its AudioSet
    recipe not at all, so ±6 dB; CED and EfficientAT mask one span of up to
    192 frames of 10 ms in time; CED masks up to 24 of 64 mel bands (0-8 kHz),
    which at its widest removes everything above about 2.7 kHz, hence a
    low-pass at 2-8 kHz on half the views.
    """

    shift_s: float = 5.0  # largest shift either way, seconds
    roll: bool = True  # roll around the clip end (else zero-fill)
    gain_db: float = 6.0  # gain drawn uniformly in [-gain_db, +gain_db] dB
    time_masks: int = 1  # zeroed spans per view
    time_mask_s: float = 1.92  # longest span, seconds
    lowpass_p: float = 0.5  # share of views that are band-limited
    lowpass_hz: tuple[float, float] = (2000.0, 8000.0)  # cutoff range, Hz

    def __post_init__(self) -> None:
        if min(self.shift_s, self.gain_db, self.time_masks, self.time_mask_s) < 0:
            raise ValueError(f"augmentation amounts must be >= 0: {self}")
        if not 0.0 <= self.lowpass_p <= 1.0:
            raise ValueError(f"lowpass_p must be in [0, 1], got {self.lowpass_p}")
        low, high = self.lowpass_hz
        if not 0.0 < low <= high:
            raise ValueError(f"lowpass_hz must be (low, high) with 0 < low <= high, got {self.lowpass_hz}")


@dataclass(frozen=True)
class ViewPlan:
    """Which views of every clip the teachers heard: `count` views besides the clean clip, drawn with `seed`
    and `augment`. Without views (count 0) seed and augmentation mean nothing and stay at their defaults,
    so every view-less config has the one plan `NO_VIEWS`."""

    count: int = 0
    seed: int = 0
    augment: ViewAugment = field(default_factory=ViewAugment)

    @classmethod
    def from_config(cls, extract: ExtractConfig) -> ViewPlan:
        """The plan `extract.views`, `extract.view_seed` and `extract.augment` describe."""
        if not extract.views:
            return NO_VIEWS
        return cls(extract.views, extract.view_seed, ViewAugment(**extract.augment.model_dump()))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, as a store's attribute records it."""
        plan = asdict(self)
        plan["augment"]["lowpass_hz"] = list(self.augment.lowpass_hz)
        return plan

    @classmethod
    def from_json(cls, recorded: dict[str, Any]) -> ViewPlan:
        """The plan a store recorded (`to_json`)."""
        augment = dict(recorded["augment"])
        augment["lowpass_hz"] = tuple(augment["lowpass_hz"])
        return cls(int(recorded["count"]), int(recorded["seed"]), ViewAugment(**augment))

    def differences(self, other: ViewPlan) -> list[str]:
        """`name: mine vs other's` for each setting in which two plans differ (augmentation by its fields)."""
        found = [f"{name}: {getattr(self, name)} vs {getattr(other, name)}" for name in ("count", "seed")
                 if getattr(self, name) != getattr(other, name)]
        for setting in fields(ViewAugment):
            mine, theirs = getattr(self.augment, setting.name), getattr(other.augment, setting.name)
            if mine != theirs:
                found.append(f"augment.{setting.name}: {mine} vs {theirs}")
        return found

    def __str__(self) -> str:
        if not self.count:
            return "no views"
        augment = ", ".join(f"{name}={value}" for name, value in asdict(self.augment).items())
        return f"{self.count} views, seed {self.seed}, augment({augment})"


NO_VIEWS = ViewPlan()
