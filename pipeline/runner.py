"""Bring stages up to date: compute keys, report status, run what is stale and nothing else."""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kdpipe import atomic, console, distributed
from kdpipe.cache import StageCache, environment_versions
from kdpipe.config import Config
from kdpipe.distributed import SINGLE, Ranks
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.fingerprint import FingerprintDB
from kdpipe.integrity import FileId
from kdpipe.stage import KeyComponents, Stage, StageContext, explain_change, key_components
from kdpipe.verify import Verdict, output_digests, verify_entry

State = Literal["fresh", "stale", "missing"]


@dataclass(frozen=True)
class StageStatus:
    stage: str
    key: str
    state: State
    reasons: tuple[str, ...]


class Pipeline:
    """An ordered set of stages over one config and one cache folder; the one place that knows where every
    stage's output lives (`built`, `ensure`)."""

    def __init__(self, stages: list[Stage], config: Config, ranks: Ranks = SINGLE, read_only: bool = False):
        """`read_only`: for commands that only inspect; nothing is written to the cache folder (input hashes
        are computed, not remembered)."""
        self.stages = {stage.name: stage for stage in stages}
        self.config = config
        self.ranks = ranks
        self.cache = StageCache(config.cache_dir)
        self.fingerprints = FingerprintDB(config.cache_dir / "fingerprints.json", remember=not read_only)
        self._components: dict[str, KeyComponents] = {}
        self._ensured: dict[str, Path] = {}

    def stage(self, name: str) -> Stage:
        if name not in self.stages:
            raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(self.stages)}")
        return self.stages[name]

    def components(self, name: str) -> KeyComponents:
        if name not in self._components:
            stage = self.stage(name)
            upstream = {up: self.key(up) for up in stage.upstream}
            self._components[name] = key_components(stage, self.config, upstream, self.fingerprints)
        return self._components[name]

    def key(self, name: str) -> str:
        return self.components(name).key

    def status(self, name: str) -> StageStatus:
        components = self.components(name)
        key = components.key
        if self.cache.record(name, key) is not None:
            return StageStatus(name, key, "fresh", ())
        reasons = []
        if self.cache.entry_dir(name, key).is_dir():
            reasons.append("a partial build is present" + (" (will resume)" if self.stage(name).resumable else ""))
        latest = self.cache.latest_record(name)
        if latest is None:
            return StageStatus(name, key, "missing", tuple(reasons))
        return StageStatus(name, key, "stale", tuple(explain_change(latest["components"], components) + reasons))

    def built(self, name: str) -> Path:
        """The committed output folder of `name` under this config. Never builds: a stale or missing output
        is an error naming the command that builds it (read-only commands use what is built)."""
        state = self.status(name)
        if state.state != "fresh":
            why = "; ".join(state.reasons) or "never built"
            raise ConfigError(f"{name} is {state.state} for this config ({why}): run `kdpipe "
                              f"{self.stage(name).command}` first, with the same --config and --set (or add "
                              "--build)")
        return self.cache.entry_dir(name, state.key)

    def output(self, name: str, build: bool) -> Path:
        """`name`'s output folder: brought up to date first with `build`, else as `built` finds it."""
        return self.ensure(name) if build else self.built(name)

    def ensure(self, name: str, *, force: bool = False, wait: bool = True) -> Path:
        """Bring `name`'s upstream stages up to date, then build `name` unless it is cached (or forced)."""
        if name in self._ensured and not force:
            return self._ensured[name]
        self._ensured[name] = self._ensure(name, force, wait)
        return self._ensured[name]

    def _ensure(self, name: str, force: bool, wait: bool) -> Path:
        stage = self.stage(name)
        upstream = {up: self.ensure(up, wait=wait) for up in stage.upstream}
        key = self.key(name)
        out_dir = self.cache.entry_dir(name, key)
        if not force and self.cache.record(name, key) is not None:
            console.info(f"[green]{name}[/green]: cached ({key})")
            return out_dir
        for reason in self.status(name).reasons:  # --verbose: why this stage is being built
            console.debug(f"{name}: {reason}")
        with self.cache.lock(name, key, wait=wait), contextlib.ExitStack() as reading:
            for up in stage.upstream:  # held while this stage reads them: `cache gc` skips them
                reading.enter_context(self.cache.reading(up, self.key(up)))
            if not force and self.cache.record(name, key) is not None:  # built while we waited
                console.info(f"[green]{name}[/green]: cached ({key}), built by another process")
                return out_dir
            build_dir = self.build_dir(name, key, force)
            if build_dir == out_dir:
                self._prepare_folder(stage, out_dir, force)
            else:
                console.info(f"{name}: rebuilding beside the committed output, which stays until this one is done")
                build_dir.mkdir(parents=True)
            started = time.time()
            summary = stage.run(StageContext(self.config, build_dir, upstream, key, self.components(name).inputs,
                                             self.ranks))
            atomic.remove_leftovers(build_dir)
            missing = [path for path in stage.outputs if not (build_dir / path).exists()]
            if missing:
                raise KdpipeError(f"{name} finished without producing {', '.join(missing)}")
            finished = time.time()
            record = {
                "stage": name,
                "key": key,
                "components": self.components(name).as_json(),
                "started": started,
                "finished": finished,
                "seconds": round(finished - started, 3),
                "versions": environment_versions(),
                "outputs": list(stage.outputs),
                "digests": output_digests(build_dir, stage.outputs),
                "summary": summary,
            }
            if build_dir == out_dir:
                self.cache.commit(name, key, record)
            else:
                self.cache.replace(name, key, build_dir, record)
        console.info(f"[green]{name}[/green]: done in {finished - started:.1f} s ({key})")
        return out_dir

    def build_dir(self, name: str, key: str, force: bool) -> Path:
        """Where `name` is built: its entry folder, or beside it when a forced rebuild replaces a committed
        output (which stays committed and usable until the new one is: StageCache.replace)."""
        if force and self.cache.record(name, key) is not None:
            return self.cache.rebuild_dir(name, key)
        return self.cache.entry_dir(name, key)

    def _prepare_folder(self, stage: Stage, out_dir: Path, force: bool) -> None:
        self.cache.uncommit(stage.name, out_dir.name)
        partial = out_dir.is_dir() and any(out_dir.iterdir())
        if partial and (force or not stage.resumable):
            console.info(f"{stage.name}: discarding {'previous' if force else 'partial'} build in {out_dir}")
            shutil.rmtree(out_dir)
        elif partial:
            console.info(f"{stage.name}: resuming partial build in {out_dir}")
        else:
            console.info(f"{stage.name}: building ({out_dir.name})")
        out_dir.mkdir(parents=True, exist_ok=True)

    def verify(self, names: list[str] | None = None, *, mark: bool = True) -> list[Verdict]:
        """Check the committed entries of `names` (default: every stage) against their checksums and digests;
        with `mark`, damaged ones are uncommitted so the next run rebuilds what is damaged. A chunk file two
        entries share (hard links) is decoded once."""
        verified: set[FileId] = set()
        return [verify_entry(self.cache, name, self.key(name), mark=mark, verified=verified)
                for name in names or list(self.stages)]

    def referenced_keys(self) -> dict[str, str]:
        """The key of every stage under the current config: what `cache gc` keeps."""
        return {name: self.key(name) for name in self.stages}


def ensure_on_every_rank(pipeline: Pipeline, name: str, ranks: Ranks, force: bool = False) -> Path | None:
    """Build stage `name` with every rank taking part; only rank 0 touches the cache.

    Rank 0 brings the upstream stages up to date, then builds `name` as usual (lock,
    output folder, record) while the other ranks run the same stage on the context it
    sends them. When the output is already cached, every rank returns at once.
    Returns the output folder on rank 0, None on the others.
    """
    plan = None
    if ranks.is_main:
        upstream = {up: pipeline.ensure(up) for up in pipeline.stage(name).upstream}
        key = pipeline.key(name)
        if force or pipeline.cache.record(name, key) is None:
            plan = (upstream, key, pipeline.components(name).inputs, pipeline.build_dir(name, key, force))
    plan = distributed.broadcast(plan, ranks)
    if ranks.is_main:
        return pipeline.ensure(name, force=force)
    if plan is not None:
        upstream, key, inputs, build_dir = plan
        pipeline.stage(name).run(StageContext(pipeline.config, build_dir, upstream, key, inputs, ranks))
    return None
