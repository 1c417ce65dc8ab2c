"""The on-disk stage cache: `<cache_dir>/<stage>/<key>/`, its commit record and its lock.

A stage's folder holds its outputs and, written last by atomic rename,
`record.json`. Only a folder with a record is done: a folder without one is a
partial build, to be resumed (stages that support it) or rebuilt. Each
`<stage>/latest` names the last key built, so `kdpipe status` can say why the
current key differs from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from kdpipe import atomic, console
from kdpipe.errors import ConfigError, LockBusy
from kdpipe.filesystems import check_cache_filesystem

RECORD = "record.json"
RECORD_FIELDS = ("stage", "key", "components", "finished", "outputs")
LATEST = "latest"
REBUILD, PREVIOUS = ".rebuild", ".previous"  # beside a committed entry while a forced rebuild replaces it


class StageCache:
    def __init__(self, root: Path):
        self.root = root

    def check_writable(self) -> None:
        """Create the cache folder and write a probe in it, and check its locks and renames hold (kdpipe.filesystems):
        an unusable `cache_dir` fails here, naming the key."""
        probe = self.root / f".probe.{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cache_dir: {self.root} cannot be used ({exc.strerror or exc}); "
                              "choose a folder kdpipe can create and write, e.g. --set cache_dir=PATH") from None
        check_cache_filesystem(self.root)

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock_path(self, stage: str, key: str) -> Path:
        """The entry's lock file, beside its folder (it outlives a removed folder while held)."""
        return self.root / stage / f"{key}.lock"

    def record(self, stage: str, key: str) -> dict[str, Any] | None:
        """The commit record of a finished build, or None if there is none.

        A record that does not parse, or lacks its fields, means "not built": the entry is
        rebuilt (with a warning), never taken as fresh and never a crash.
        """
        path = self.entry_dir(stage, key) / RECORD
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            console.warn(f"{path} is unreadable ({exc}); treating {stage} ({key}) as not built")
            return None
        missing = [field for field in RECORD_FIELDS if not isinstance(record, dict) or field not in record]
        if missing:
            console.warn(f"{path} lacks {', '.join(missing)}; treating {stage} ({key}) as not built")
            return None
        if record["stage"] != stage or record["key"] != key:
            console.warn(f"{path} records {record['stage']} ({record['key']}); treating {stage} ({key}) as not built")
            return None
        return record

    def latest_record(self, stage: str) -> dict[str, Any] | None:
        try:
            key = (self.root / stage / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        return self.record(stage, key)

    def commit(self, stage: str, key: str, record: dict[str, Any]) -> None:
        """Write the record last and atomically: its presence is what 'done' means."""
        _write_record(self.entry_dir(stage, key), record)
        self._mark_latest(stage, key)

    def _mark_latest(self, stage: str, key: str) -> None:
        atomic.write_text(self.root / stage / LATEST, key + "\n")

    def uncommit(self, stage: str, key: str) -> None:
        """Drop the record first, so a rebuild killed half-way is never taken as done."""
        (self.entry_dir(stage, key) / RECORD).unlink(missing_ok=True)

    def rebuild_dir(self, stage: str, key: str) -> Path:
        """Where a forced rebuild of a committed entry is built, beside it, until `replace` swaps them."""
        return self.root / stage / f"{key}{REBUILD}"

    def replace(self, stage: str, key: str, built: Path, record: dict[str, Any]) -> None:
        """Commit a forced rebuild in place of the committed entry. The old output stays committed until the
        new one is complete: the record is written in `built`, the folders swap by two renames, and the old
        one is removed last. A crash at any point leaves one committed entry (`recover`)."""
        _write_record(built, record)
        entry = self.entry_dir(stage, key)
        previous = entry.with_name(f"{key}{PREVIOUS}")
        os.rename(entry, previous)
        os.rename(built, entry)
        self._mark_latest(stage, key)
        shutil.rmtree(previous)

    def recover(self, stage: str, key: str) -> None:
        """Under the entry's lock: finish or undo a forced rebuild that was interrupted. Killed between the two
        renames, the old output goes back in place; killed after them, the old one is removed; a rebuild that
        never finished is removed (the committed entry was never touched)."""
        entry = self.entry_dir(stage, key)
        previous, rebuild = entry.with_name(f"{key}{PREVIOUS}"), self.rebuild_dir(stage, key)
        if previous.is_dir():
            if entry.is_dir():
                shutil.rmtree(previous)
            else:
                os.rename(previous, entry)
                console.warn(f"{stage} ({key}): a forced rebuild was interrupted; the previous output is back")
        if rebuild.is_dir():
            console.info(f"{stage} ({key}): removing an unfinished forced rebuild")
            shutil.rmtree(rebuild)

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, wait: bool = True) -> Iterator[None]:
        """Exclusive per-entry lock (flock): a second builder waits, or fails naming the holder."""
        path = self.lock_path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = path.read_text().strip() or "another process"
                if not wait:
                    raise LockBusy(f"{stage} ({key}) is being built by {holder}; rerun without --no-wait to wait")
                console.info(f"{stage}: waiting for {holder} to finish building {key}")
                fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            self.recover(stage, key)
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def reading(self, stage: str, key: str) -> Iterator[None]:
        """A shared lock on an entry a build reads: `cache gc` (which needs it exclusively) leaves it alone."""
        path = self.lock_path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def claim(self, entry: CacheEntry) -> Iterator[str | None]:
        """Hold an entry exclusively if nobody builds or reads it: yields None then, else who holds it."""
        path = self.lock_path(entry.stage, entry.key)
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield path.read_text().strip() or "a build reading it"
                return
            try:
                yield None
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def entries(self) -> list[CacheEntry]:
        """Every entry ever built here, also of stages the current config no longer has.

        An entry is a folder with a `<key>.lock` beside it: the runner takes that lock before building.
        """
        found = []
        for lock in sorted(self.root.rglob("*.lock")):
            folder = lock.with_suffix("")
            if folder.is_dir():
                stage = folder.parent.relative_to(self.root).as_posix()
                found.append(CacheEntry(stage, folder.name, folder, (folder / RECORD).is_file()))
        return found

    def collect_garbage(self, keep: set[tuple[str, str]], dry_run: bool = False
                        ) -> Iterator[tuple[CacheEntry, str | None, int]]:
        """Remove every entry whose (stage, key) is not in `keep`, unless it is being built or read: yields
        (entry, who holds it or None, bytes freed). With `dry_run`, removes nothing (and files two entries
        share count for neither)."""
        for entry in self.entries():
            if (entry.stage, entry.key) in keep:
                continue
            with self.claim(entry) as holder:
                size = 0 if holder is not None else entry.size_bytes(alone=True)
                if holder is None and not dry_run:
                    self.remove(entry)
                yield entry, holder, size

    def remove(self, entry: CacheEntry) -> None:
        shutil.rmtree(entry.path)
        for leftover in (entry.path.with_name(entry.key + PREVIOUS), self.rebuild_dir(entry.stage, entry.key)):
            shutil.rmtree(leftover, ignore_errors=True)
        self.lock_path(entry.stage, entry.key).unlink(missing_ok=True)
        latest = entry.path.parent / LATEST
        if latest.is_file() and latest.read_text().strip() == entry.key:
            latest.unlink()


@dataclass(frozen=True)
class CacheEntry:
    stage: str
    key: str
    path: Path
    complete: bool

    def size_bytes(self, alone: bool = False) -> int:
        """Bytes of the entry's files; with `alone`, only of those no other entry hard-links (a combined
        teachers.zarr links its teachers' chunks): what removing it frees now."""
        return tree_bytes(self.path, alone)


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    atomic.write_text(folder / RECORD, json.dumps(record, indent=2, sort_keys=True))


def tree_bytes(folder: Path | str, alone: bool = False) -> int:
    """Bytes of the files under `folder` (with `alone`, of those with one link only). By os.scandir: a store
    of 40 views has 12 k chunk files, which pathlib's rglob took 0.9 s to size and scandir 0.1."""
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                total += tree_bytes(entry.path, alone)
            elif entry.is_file(follow_symlinks=False):
                stat = entry.stat(follow_symlinks=False)
                total += stat.st_size if not alone or stat.st_nlink == 1 else 0
    return total


def environment_versions() -> dict[str, str]:
    """Versions recorded (not keyed on: an upgrade should not invalidate every output)."""
    versions = {"python": platform.python_version()}
    for package in ("kdpipe", "torch", "torchaudio", "zarr", "numpy", "dask"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions
