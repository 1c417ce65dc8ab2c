"""`kdpipe verify`: check committed cache entries against their checksums and digests, and mark damage.

A damaged entry loses its commit record, so `status` calls it stale with the reason and the next
`run` rebuilds it. Where the damage lies in units of a resumable store (a waveform shard, a
logits chunk), only those units lose their done flags and the rebuild recomputes them alone;
otherwise the entry's folder is removed and the stage is rebuilt whole.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kdpipe import integrity
from kdpipe.cache import StageCache, tree_bytes
from kdpipe.errors import LockBusy
from kdpipe.fingerprint import sha256_file


def output_digests(out_dir: Path, outputs: tuple[str, ...]) -> dict[str, str]:
    """sha256 of each output that is a file (Zarr stores carry their own chunk checksums)."""
    return {name: sha256_file(out_dir / name) for name in outputs if (out_dir / name).is_file()}


@dataclass(frozen=True)
class Verdict:
    stage: str
    key: str
    problems: tuple[str, ...]
    action: str  # "ok", "marked: n damaged unit(s) ...", "removed: ...", "skipped: ...", "not built"
    bytes_checked: int
    seconds: float


def verify_entry(cache: StageCache, stage: str, key: str, *, mark: bool = True,
                 verified: set[integrity.FileId] | None = None) -> Verdict:
    """Decode every chunk of the entry's stores and hash its files; with `mark`, act on damage. Chunk files
    in `verified` (decoded without fault through another entry's hard link) are not decoded again."""
    record = cache.record(stage, key)
    folder = cache.entry_dir(stage, key)
    if record is None:
        return Verdict(stage, key, (), "not built", 0, 0.0)
    started = time.perf_counter()
    try:
        with cache.lock(stage, key, wait=False):
            problems, damaged_stores, files_damaged = _check(folder, record, verified)
            action = "ok"
            if problems and mark:
                action = _mark(cache, stage, key, damaged_stores, files_damaged)
    except LockBusy as exc:
        return Verdict(stage, key, (), f"skipped: {exc}", 0, 0.0)
    size = tree_bytes(folder) if folder.is_dir() else 0
    return Verdict(stage, key, tuple(problems), action if problems else "ok", size, time.perf_counter() - started)


def _check(folder: Path, record: dict, verified: set[integrity.FileId] | None
           ) -> tuple[list[str], dict[Path, list[integrity.Damage]], bool]:
    """Problems found, the damage per Zarr store, and whether a plain output file is missing or changed."""
    problems: list[str] = []
    files_damaged = False
    stores: dict[Path, list[integrity.Damage]] = {}
    digests = record.get("digests", {})
    for name in record["outputs"]:
        path = folder / name
        if not path.exists():
            problems.append(f"{name} is missing")
            files_damaged = True
        elif path.is_dir():
            try:
                damage = integrity.find_damage(path, verified=verified)
            except Exception as exc:  # noqa: BLE001 - unreadable metadata is damage too
                problems.append(f"{name} cannot be opened ({exc})")
                files_damaged = True
                continue
            if damage:
                stores[path] = damage
                problems.extend(str(d).replace(str(folder) + "/", "") for d in damage)
        elif name in digests and sha256_file(path) != digests[name]:
            problems.append(f"{name} differs from its recorded sha256")
            files_damaged = True
    return problems, stores, files_damaged


def _mark(cache: StageCache, stage: str, key: str, stores: dict[Path, list[integrity.Damage]],
          files_damaged: bool) -> str:
    """Uncommit the entry; keep it for a partial rebuild when every damage lies in resumable units."""
    cache.uncommit(stage, key)
    if not files_damaged and all(integrity.repair(path, damage) for path, damage in stores.items()):
        return f"marked: {sum(len(d) for d in stores.values())} damaged unit(s) will be rebuilt"
    shutil.rmtree(cache.entry_dir(stage, key))
    return "removed: the stage will be rebuilt"
