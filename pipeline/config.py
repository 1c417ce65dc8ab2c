"""The run config: one typed, validated description of a whole run.

Precedence: schema defaults < YAML file < `--set a.b.c=value` < first-class
CLI flags. Every value is validated and coerced by the schema at load, so a
user error is reported once, with the key's path and what is allowed, and
cache keys hash canonical typed values rather than YAML text.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdpipe.errors import ConfigError, KdpipeError


class _Section(BaseModel):
    """Strict section: unknown keys are errors, values are immutable, floats are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def unkeyed(default: Any, description: str, **constraints: Any) -> Any:
    """A setting that changes speed or placement, never results: no stage key contains it, so changing it
    rebuilds nothing. Every other field is keyed (see `keyed_values`)."""
    return Field(default, description=description, json_schema_extra={"keyed": False}, **constraints)


def is_keyed(section: type[BaseModel], name: str) -> bool:
    extra = section.model_fields[name].json_schema_extra
    return not (isinstance(extra, dict) and extra.get("keyed") is False)


# --------------------------------------------------------------------- schema
class SourceConfig(_Section):
    """One input listing clips: our CSV manifest, an official AudioSet segment CSV, or a PaSST HDF5 file."""

    format: Literal["csv", "audioset", "hdf5"] = "csv"
    path: Path = Field(description="manifest CSV, AudioSet segments CSV or HDF5 file")
    audio_dir: Path | None = Field(None, description="folder with the audio files (format: audioset)")
    split: str | None = Field(None, description="split for clips that name none (e.g. train, eval)")
    labels: Literal["given", "none"] = Field("given", description="none: unlabelled audio, whatever the source "
                                             "lists; its clips teach through the teachers' targets only")


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    class_list: Path | None = Field(
        None, description="class list in AudioSet's class_labels_indices.csv format; default: the labels found"
    )
    sample_rate: int = Field(32000, ge=8000, le=96000, description="rate of the waveform store")
    clip_seconds: float = Field(10.0, gt=0, le=600, description="clips are padded or cropped to this length")
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of the train clips held out (by a hash of the clip id) as the validation "
        "split that trained stages measure each epoch on, when the data has no 'validation' or 'val' split of its "
        "own; 0 = none. Never trained on; prepare ignores it (kdpipe.splits)")


class PrepareConfig(_Section):
    workers: int = unkeyed(0, "decoding processes; 0 = one per CPU core", ge=0)
    on_error: Literal["skip", "fail"] = Field("skip", description="bad audio: list it in skipped.csv, or stop")
    min_seconds: float = Field(1.0, ge=0, description="shorter audio is rejected as too short")
    silence_threshold: float = Field(1e-4, ge=0, lt=1, description="peak amplitude below this is silent")
    shard_clips: int = Field(256, ge=1, le=65536, description="clips per Zarr shard (one file, one writer)")
    compression: Literal["none", "zstd"] = Field("none", description="waveform codec; none reads fastest")


def known_options(arch: str | None, options: dict[str, Any]) -> None:
    """A model's options must be arguments of its constructor: a typo fails when the config loads."""
    from kdpipe.models import check_options

    if arch is not None:
        try:
            check_options(arch, options)
        except KdpipeError as error:
            raise ValueError(str(error)) from None


def registered_arch(arch: str | None) -> str | None:
    """An architecture must be in the model registry: caught when the config loads, not hours into a run."""
    from kdpipe.models import check_model_name  # imports torch: only when an arch is validated

    if arch is not None:
        try:
            check_model_name(arch)
        except KdpipeError as error:
            raise ValueError(str(error)) from None
    return arch


class TeacherConfig(_Section):
    """A teacher: a registry model (with a checkpoint, or trained by train-teacher) or imported logits."""

    name: str | None = Field(None, description="unique name of this teacher; default: its arch")
    arch: str | None = Field(None, description="registry architecture, e.g. passt_s_s10")
    checkpoint: Path | None = Field(None, description="weights to use; null = train it with train-teacher")
    init: Path | None = Field(None, description="starting weights for train-teacher (fine-tuning)")
    weight: float = Field(1.0, ge=0, description="ensemble weight")
    options: dict[str, Any] = Field(default_factory=dict, description="create_model overrides, e.g. {depth: 4}")
    frontend: dict[str, Any] = Field(default_factory=dict, description="frontend overrides, e.g. {fmax: 14000}")
    logits: Path | None = Field(None, description="EfficientAT-format .npy of logits to import instead of a model")
    logits_index: Path | None = Field(None, description="its fname_to_index.pkl (YouTube id -> row)")

    _registered = field_validator("arch")(classmethod(lambda cls, arch: registered_arch(arch)))

    @model_validator(mode="after")
    def _model_or_logits(self) -> TeacherConfig:
        if (self.arch is None) == (self.logits is None):
            raise ValueError("give either arch (a model) or logits (an imported .npy), not both or neither")
        if (self.logits is None) != (self.logits_index is None):
            raise ValueError("logits and logits_index go together")
        known_options(self.arch, self.options)
        return self

    @property
    def label(self) -> str:
        return self.name or self.arch or self.logits.stem  # type: ignore[union-attr]

    @property
    def trainable(self) -> bool:
        """A model without weights: train-teacher makes them."""
        return self.arch is not None and self.checkpoint is None


PRECISION = "auto: bf16 autocast on CUDA, fp32 on a CPU (bf16 on a CPU only when asked for); see kdpipe.devices"


class TrainingConfig(_Section):
    """The schedule both training stages share (EfficientAT's: warm-up, flat, linear ramp-down);
    `training.FitSettings.from_config` hands it to `training.fit`. Defaults are the student's; teachers override
    some."""

    epochs: int = Field(200, ge=1)
    epoch_samples: int = Field(100_000, ge=0, description="clips drawn per epoch by the sampler, unlabelled "
                               "ones included (they take draws from the labelled); 0 = as many as there are "
                               "training clips")
    batch_size: int = Field(120, ge=1)
    balanced_sampling: bool = Field(True, description="EfficientAT's class-balanced weighted sampling")
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(8e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_epochs: int = Field(8, ge=0)
    rampdown_start: int = Field(80, ge=0)
    rampdown_epochs: int = Field(95, ge=1)
    last_lr_factor: float = Field(0.01, ge=0, le=1)
    mixup_alpha: float = Field(0.3, ge=0, description="0 = no mixup")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=PRECISION + "; the loss is in fp32")
    compile: bool = unkeyed(False, "torch.compile the model for training steps")
    num_workers: int = unkeyed(2, "loader processes", ge=0)
    keep: Literal["last", "best"] = Field("last", description="the checkpoint a training keeps: the last epoch "
                                          "(EfficientAT's practice), or the epoch with the best validation mAP "
                                          "(needs a validation split; see data.validation_fraction)")


class TeacherTrainingConfig(TrainingConfig):
    """How train-teacher trains or fine-tunes the teachers that have no checkpoint (labels only)."""

    epochs: int = Field(30, ge=1)
    epoch_samples: int = Field(0, ge=0, description="clips per epoch; 0 = every training clip")
    batch_size: int = Field(12, ge=1)
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(2, ge=0)
    rampdown_start: int = Field(5, ge=0)
    rampdown_epochs: int = Field(20, ge=1)
    folds: int = Field(1, ge=1, le=10, description="cross-fitting: train this many models per teacher, each "
                       "without one fold of the train clips, and label each train clip with the model that never "
                       "saw it (others: their mean); 1 = one model that labels the clips it learnt from")


class AugmentConfig(_Section):
    """How the views of a clip are augmented, in the waveform domain (kdpipe.views defines each step);
    0 (or p = 0) switches a step off."""

    shift_s: float = Field(5.0, ge=0, description="largest time shift either way, seconds (CED: half the clip)")
    roll: bool = Field(True, description="shifted audio rolls around the clip end (else zero-filled)")
    gain_db: float = Field(6.0, ge=0, description="gain drawn uniformly in [-gain_db, +gain_db] dB")
    time_masks: int = Field(1, ge=0, le=16, description="zeroed spans per view")
    time_mask_s: float = Field(1.92, ge=0, description="longest zeroed span, seconds")
    lowpass_p: float = Field(0.5, ge=0, le=1, description="share of views that are band-limited")
    lowpass_hz: tuple[float, float] = Field((2000.0, 8000.0), description="low-pass cutoff range, Hz")

    @field_validator("lowpass_hz")
    @classmethod
    def _ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        if not 0 < band[0] <= band[1]:
            raise ValueError("a range [low, high] with 0 < low <= high")
        return band


class ExtractConfig(_Section):
    batch_size: int = unkeyed(64, "clips per forward pass; halves itself on out-of-memory", ge=1)
    dtype: Literal["float16", "float32"] = Field("float16", description="stored logits")
    chunk_clips: int = Field(4096, ge=1, description="clips per logits chunk: one write, the unit of resume")
    ensemble: Literal["logits", "probabilities"] = Field("logits", description="average logits or probabilities")
    engine: Literal["local", "dask"] = unkeyed("local", "where teachers run: this process, or dask workers")
    scheduler: str | None = unkeyed(None, "dask scheduler address; null = a local cluster")
    dask_workers: int = unkeyed(0, "local cluster workers; 0 = one per GPU (2 on a CPU)", ge=0)
    num_workers: int = unkeyed(2, "local engine: loader processes prefetching audio", ge=0)
    compile: bool = unkeyed(False, "torch.compile the teachers (a minute to compile; mn10 ~2x on a CPU)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description=PRECISION)
    views: int = Field(0, ge=0, le=1000, description="consistent teaching (CED): also run every teacher on this "
                       "many augmented views of every clip; 0 = clean clips only (EfficientAT)")
    view_seed: int = Field(0, ge=0, description="with the row and the view index, fixes each view's augmentation")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    topk: int = Field(20, ge=0, description="keep each teacher's top-k logits per view (values and class "
                      "indexes; CED keeps 20); 0 = every class (AudioSet, K = 40: 84 GB per teacher, top-20 6.4)")


class KDConfig(_Section):
    enabled: bool = True
    label_weight: float = Field(0.1, ge=0, le=1, description="lambda: weight of the label loss")
    temperature: float = Field(1.0, gt=0)
    unlabelled_threshold: float = Field(
        0.5, gt=0, lt=1, description="an unlabelled clip is drawn for the classes the teacher ensemble hears in it "
        "with at least this probability (kdpipe.training.epoch_plan); one with none is never drawn")
    views: bool | None = Field(None, description="learn view e mod K at epoch e from its target, reproducing its "
                               "audio (consistent teaching); default: true when extract.views > 0")
    topk_fill: Literal["zero", "last_mean", "min"] = Field(
        "zero", description="what the classes outside a view's top-k become (kdpipe.topk): zero (CED's recipe: "
        "probability ~0), last_mean (CED's reader default), or min (the smallest kept logit)")


class StudentConfig(TrainingConfig):
    arch: str = Field("mobilenetv3", description="registry architecture of the student")
    width: float = Field(1.0, gt=0, le=4.0, description="width multiplier of the width-free archs mobilenetv3 and dymn "
                       "(mn10 is mobilenetv3 at 1.0, dymn04 is dymn at 0.4)")
    options: dict[str, Any] = Field(default_factory=dict, description="create_model overrides, e.g. {bn_momentum: 0.1}")
    init: Path | None = Field(None, description="starting weights instead of random ones: an EfficientAT checkpoint "
                              "(mn*_im.pt from ImageNet, mn*_as.pt, dymn*_as.pt) or a kdpipe train-student output "
                              "(its folder or a .pt); the body loads strictly, a head of other classes starts afresh. "
                              "The file's content is keyed, not its path")
    kd: KDConfig = Field(default_factory=KDConfig)
    representations: list[Literal["mel", "mfcc", "stft"]] = Field(
        default_factory=list, description="train one student per representation together, with mutual KD "
        "(multi-representation mode); empty = one student on the model's own frontend")
    mutual_weight: float = Field(1.0, ge=0, description="weight of the mutual-KD term between representations")
    keep_members: Literal["best", "all"] = Field("best", description="multi-representation mode: keep the student "
                                                 "with the best validation mAP, or every student")
    seed: int | None = Field(None, ge=0, description="the student's own seed (init, sampling, mixup); "
                             "default: the run's seed. Vary it to repeat a student over the same teacher logits")

    _registered = field_validator("arch")(classmethod(lambda cls, arch: registered_arch(arch)))

    @model_validator(mode="after")
    def _known_options(self) -> StudentConfig:
        known_options(self.arch, self.options)
        return self

    @field_validator("representations")
    @classmethod
    def _distinct_representations(cls, representations: list[str]) -> list[str]:
        if len(set(representations)) != len(representations):
            raise ValueError("each representation may appear once")
        return representations


VALIDATION_SPLITS = ("validation", "val")
"""Split names a manifest may give its validation clips (kdpipe.splits)."""


class EvaluationConfig(_Section):
    split: str = Field("eval", description="split every model is scored on, by the evaluate stage only; no "
                       "training step reads it")
    baseline: bool = Field(False, description="also train the student without KD (stage train-student/no-kd) "
                           "and evaluate it beside the KD student")
    batch_size: int = unkeyed(64, "clips per forward pass", ge=1)

    @field_validator("split")
    @classmethod
    def _not_for_selection(cls, split: str) -> str:
        if split in VALIDATION_SPLITS or split == "train":
            raise ValueError(f"'{split}' is a split training reads (train, or validation for choosing checkpoints); "
                             "score on a split no training step sees, e.g. eval")
        return split


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    teachers: list[TeacherConfig] = Field(default_factory=list)
    teacher_training: TeacherTrainingConfig = Field(default_factory=TeacherTrainingConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    cache_dir: Path = unkeyed(Path("kdpipe-cache"), "where stage outputs live")
    device: str = unkeyed("auto", "auto, cpu, cuda or cuda:N (the precision it implies is keyed)",
                          pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    seed: int = Field(0, ge=0)

    def teacher(self, label: str) -> TeacherConfig:
        """The teacher entry called `label`."""
        return next(teacher for teacher in self.teachers if teacher.label == label)

    @model_validator(mode="after")
    def _views_have_their_targets(self) -> Config:
        if self.student.kd.views and not self.extract.views:
            raise ValueError("student.kd.views: true needs views to learn from; set extract.views > 0")
        imported = [teacher.label for teacher in self.teachers if teacher.logits is not None]
        if self.extract.views and imported:
            raise ValueError(f"extract.views: imported logits ({', '.join(imported)}) have no views; "
                             "use model teachers, or extract.views: 0")
        return self

    @field_validator("teachers")
    @classmethod
    def _unique_teacher_names(cls, teachers: list[TeacherConfig]) -> list[TeacherConfig]:
        labels = [teacher.label for teacher in teachers]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"names must be unique; give `name:` to the teachers called {', '.join(repeated)}")
        return teachers


# ------------------------------------------------------------------ YAML 1.2
class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML is YAML 1.1: `yes` is a bool, `1e-3` a string, `010` octal, dates are dates.

    This loader resolves plain scalars the YAML 1.2 way so values mean what they
    look like; the schema then coerces them to their declared types.
    """


_YAML11_SCALAR_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float", "timestamp")}
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_SCALAR_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAML12_SCALARS = [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^[-+]?[0-9]+$", "-+0123456789"),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     "-+0123456789."),
]
for _tag, _pattern, _first in _YAML12_SCALARS:
    _Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))
_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))


def parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None


# ------------------------------------------------------------------- loading
def load_config(
    path: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
    *,
    check_files: bool = True,
) -> Config:
    """Resolve defaults < file < `--set` overrides < flags, validate, and return the config.

    `flags` maps dotted keys to values given by first-class CLI flags (None = not given).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        raw = parse_yaml(path.read_text(), str(path))
        if raw is None:
            raise ConfigError(f"{path}: the file is empty; a config is a mapping of sections (see configs/)")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set student.width=2.0")
        _set_dotted(raw, key.strip(), parse_yaml(text, f"--set {key}"))
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    if check_files:
        check_input_files(config)
    return config


def check_input_files(config: Config) -> None:
    """Every path the config names as an input must exist (exit 2 naming the key otherwise)."""
    problems = []
    for i, source in enumerate(config.data.sources):
        if not source.path.is_file():
            problems.append(f"data.sources.{i}.path: no such file: {source.path}")
        if source.format == "audioset" and source.audio_dir is None:
            problems.append(f"data.sources.{i}.audio_dir: required for format 'audioset'")
        elif source.audio_dir is not None and not source.audio_dir.is_dir():
            problems.append(f"data.sources.{i}.audio_dir: no such folder: {source.audio_dir}")
    if config.data.class_list is not None and not config.data.class_list.is_file():
        problems.append(f"data.class_list: no such file: {config.data.class_list}")
    if config.student.init is not None and not config.student.init.exists():
        problems.append(f"student.init: no such file or folder: {config.student.init}")
    for i, teacher in enumerate(config.teachers):
        for key in ("checkpoint", "init", "logits", "logits_index"):
            path = getattr(teacher, key)
            if path is not None and not path.is_file():
                problems.append(f"teachers.{i}.{key}: no such file: {path}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists, creating containers on the way (the schema judges the keys).

    A list index equal to the list's length appends an entry, so `data.sources.0.path=x` works on defaults.
    """
    parts = dotted.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        fresh: Any = value if last else [] if parts[depth + 1].isdigit() else {}
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[:depth])} has {len(node)} entries; "
                                  f"'{part}' is not a valid index")
            if int(part) == len(node):
                node.append(fresh)
            elif last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            node = node.setdefault(part, fresh)
        else:
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:depth])} is a value, not a section")


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            valid = _field_names_at(error["loc"][:-1])
            close = difflib.get_close_matches(str(error["loc"][-1]), valid, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            lines.append(f"{loc}: unknown key; {hint}valid keys here: {', '.join(valid)}")
        elif error["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        else:
            shown = "" if isinstance(error["input"], (dict, list)) else f" (got {error['input']!r})"
            message = error["msg"].removeprefix("Value error, ")  # our validators' own words
            lines.append(f"{loc}: {message}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _field_names_at(loc: tuple[Any, ...]) -> list[str]:
    """Names of the keys the schema allows at `loc` (list indices skipped)."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[str(part)].annotation
        args = getattr(annotation, "__args__", ())
        model = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), model)
    return list(model.model_fields)


def to_plain(config: BaseModel) -> dict[str, Any]:
    """The config as JSON-ready plain data with typed values (paths as strings)."""
    return config.model_dump(mode="json")


def keyed_values(section: BaseModel) -> dict[str, Any]:
    """`to_plain(section)` without its unkeyed fields, at every depth: all a stage key can contain."""
    return _drop_unkeyed(section, to_plain(section))


def _drop_unkeyed(value: Any, plain: Any) -> Any:
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return {name: _drop_unkeyed(getattr(value, name), plain[name]) for name in fields
                if is_keyed(type(value), name)}
    if isinstance(value, list):
        return [_drop_unkeyed(item, plain_item) for item, plain_item in zip(value, plain)]
    return plain


def select(plain: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key path of `to_plain` output."""
    node: Any = plain
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def canonical_json(value: Any) -> str:
    """Deterministic JSON for hashing: sorted keys, no whitespace, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def dump_yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False)
