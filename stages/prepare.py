"""Stage `prepare`: decode every clip of the manifests once into the int16 waveform store.

Inputs: the sources and class list named in `data`. Parameters: `data` (but
`data.validation_fraction`, which only the trained stages read) and `prepare`
(kdpipe.preparation does the work). Outputs: `waveforms.zarr` and
`skipped.csv` (every clip left out, with its reason); a killed run resumes at
the first unfinished shard.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kdpipe import preparation, stage_names
from kdpipe.config import Config
from kdpipe.stage import Stage
from kdpipe.waveform_store import STORE_FILE


def inputs(config: Config) -> dict[str, Path]:
    found = {f"data.sources.{i}.path": source.path for i, source in enumerate(config.data.sources)}
    if config.data.class_list is not None:
        found["data.class_list"] = config.data.class_list
    return found


def stages(config: Config) -> list[Stage]:
    return [Stage(
        name=stage_names.PREPARE,
        command="prepare",
        params=("data.sources", "data.class_list", "data.sample_rate", "data.clip_seconds", "prepare"),
        outputs=(STORE_FILE, preparation.SKIPPED_FILE),
        run=lambda ctx: preparation.prepare_store(ctx.config, ctx.out_dir, ctx.input_hashes),
        code=(sys.modules[__name__],),
        inputs=inputs,
        resumable=True,
    )]
