"""What a stage is (DVC's view): its inputs, its parameters and its outputs; and its cache key.

The key of a stage is a sha256 over canonical JSON of
  - the stage's name and schema version (bumped when output meaning changes);
  - the config subset it declares (canonical typed values, not YAML text; each setting that defaults
    to another at its resolved value: `resolved_settings`);
  - its upstream stages' keys (Merkle chaining: O(config), not O(data));
  - a hash of its own source code (declared modules or functions);
  - fingerprints of external inputs (manifest and checkpoint contents).
Fields marked `unkeyed` where the config defines them (worker counts, batch sizes that do not
change results, the device) never enter a key, so changing them never invalidates outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from kdpipe.config import Config, StudentConfig, canonical_json, keyed_values, select
from kdpipe.distributed import SINGLE, Ranks
from kdpipe.fingerprint import FingerprintDB, sha256_text, source_hash


@dataclass
class StageContext:
    """What a running stage gets: the config, its output folder, its upstream outputs, and its ranks."""

    config: Config
    out_dir: Path
    upstream: dict[str, Path]
    key: str
    input_hashes: dict[str, str]
    """sha256 of each external input, by label (to record in the outputs)."""
    ranks: Ranks = SINGLE


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]
    """Dotted config keys (fields or whole sections) that this stage reads; their unkeyed fields are left out."""
    outputs: tuple[str, ...]
    """Paths, relative to the stage's output folder, that the stage produces."""
    run: Callable[[StageContext], dict[str, Any]]
    """Builds the outputs; returns a small JSON summary for the record."""
    code: tuple[ModuleType | Callable[..., Any], ...]
    """Source whose edits change the outputs (hashed into the key)."""
    upstream: tuple[str, ...] = ()
    param_values: Callable[[Config], dict[str, Any]] = field(default=lambda config: {})
    """Further parameters by a stable label, for values whose config path is not fixed (a teacher's entry)."""
    inputs: Callable[[Config], dict[str, Path]] = field(default=lambda config: {})
    """External files the outputs depend on, by a readable label."""
    schema_version: int = 1
    resumable: bool = False
    """True when `run` continues a partial output folder instead of needing a fresh one."""
    command: str = "run"
    """The CLI command that builds this stage (named when its output is needed and not built)."""

    def parameters(self, config: Config) -> dict[str, Any]:
        """The parameter values that enter the key, by their names, as resolved values (one run, one key)."""
        config = resolved_settings(config)
        keyed = keyed_values(config)
        return {**{name: select(keyed, name) for name in self.params}, **self.param_values(config)}


def resolved_settings(config: Config) -> Config:
    """The config as stage keys see it: each setting that defaults to another replaced by its resolved value.

    Every spelling of one run then has one key: `student.seed` unset and set to `seed`; a teacher's
    `name` unset and set to its arch; `student.arch: mn10` and `mobilenetv3` at width 1.0 (and
    `student.width`, which only `mobilenetv3` and `dymn` read, at its default for every other arch);
    `student.kd.views` unset and what it defaults to (extract.views > 0);
    `precision: auto` and the precision it means on `device` (kdpipe.devices); a relative path
    and the absolute one (relative paths are relative to the working directory).
    """
    from kdpipe.devices import resolve_device, resolve_precision
    from kdpipe.distill import resolved_kd_views
    from kdpipe.students import canonical_arch

    data = _absolute_paths(config.model_dump())
    student = data["student"]
    student["seed"] = data["seed"] if student["seed"] is None else student["seed"]
    student["arch"], width = canonical_arch(student["arch"], student["width"])
    student["width"] = StudentConfig.model_fields["width"].default if width is None else width
    for teacher, entry in zip(config.teachers, data["teachers"]):
        entry["name"] = teacher.label
    student["kd"]["views"] = resolved_kd_views(config)
    device = resolve_device(config.device)
    for section in ("teacher_training", "extract", "student"):
        data[section]["precision"] = resolve_precision(data[section]["precision"], device)
    return Config.model_validate(data)


def _absolute_paths(value: Any) -> Any:
    if isinstance(value, Path):
        return value.expanduser().resolve()
    if isinstance(value, dict):
        return {key: _absolute_paths(child) for key, child in value.items()}
    if isinstance(value, list):
        return [_absolute_paths(child) for child in value]
    return value


@dataclass(frozen=True)
class KeyComponents:
    """Everything a stage key is made of, kept in the record to explain staleness."""

    stage: str
    schema_version: int
    params: dict[str, Any]
    upstream: dict[str, str]
    code: str
    inputs: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "schema_version": self.schema_version,
            "params": self.params,
            "upstream": self.upstream,
            "code": self.code,
            "inputs": self.inputs,
        }

    @property
    def key(self) -> str:
        return sha256_text(canonical_json(self.as_json()))[:20]


def key_components(
    stage: Stage, config: Config, upstream_keys: dict[str, str], fingerprints: FingerprintDB
) -> KeyComponents:
    return KeyComponents(
        stage=stage.name,
        schema_version=stage.schema_version,
        params=stage.parameters(config),
        upstream={name: upstream_keys[name] for name in stage.upstream},
        code=source_hash(stage.code),
        inputs={label: fingerprints.sha256(path) for label, path in sorted(stage.inputs(config).items())},
    )


def explain_change(old: dict[str, Any], new: KeyComponents) -> list[str]:
    """Human-readable differences between a recorded key's components and the current ones."""
    reasons = []
    if old.get("schema_version") != new.schema_version:
        reasons.append(f"stage schema {old.get('schema_version')} -> {new.schema_version}")
    old_flat, new_flat = _flatten(old.get("params", {})), _flatten(new.params)
    for name in sorted(old_flat.keys() | new_flat.keys()):
        before, after = old_flat.get(name, "<unset>"), new_flat.get(name, "<unset>")
        if before != after:
            reasons.append(f"{name}: {_short(before)} -> {_short(after)}")
    for name in sorted(old.get("upstream", {}).keys() | new.upstream.keys()):
        if old.get("upstream", {}).get(name) != new.upstream.get(name):
            reasons.append(f"upstream {name} changed")
    if old.get("code") != new.code:
        reasons.append("stage code changed")
    for label in sorted(old.get("inputs", {}).keys() | new.inputs.keys()):
        if old.get("inputs", {}).get(label) != new.inputs.get(label):
            reasons.append(f"input {label} changed")
    return reasons


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value:
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for name, child in items:
        flat.update(_flatten(child, f"{prefix}.{name}" if prefix else str(name)))
    return flat


def _short(value: Any) -> str:
    text = canonical_json(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
