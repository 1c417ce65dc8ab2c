"""`kdpipe manifest ...`: our CSV manifest from other descriptions of data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdpipe import console
from kdpipe.cli.common import manifest_app, user_errors


@manifest_app.command("from-audioset", epilog="Example: kdpipe manifest from-audioset eval_segments.csv audio/eval/ -o eval.csv --split eval")
@user_errors
def manifest_from_audioset(
    segments: Annotated[Path, typer.Argument(metavar="SEGMENTS_CSV", help="Official segment CSV, e.g. eval_segments.csv.", exists=True,
                                             dir_okay=False)],
    audio_dir: Annotated[Path, typer.Argument(metavar="AUDIO_DIR", help="Folder with the downloaded clips.", exists=True, file_okay=False)],
    split: Annotated[str, typer.Option(metavar="NAME", help="Split name for these clips.")] = "train",
    output: Annotated[Path, typer.Option("--output", "-o", help="Manifest CSV to write.")] = Path("manifest.csv"),
) -> None:
    """Write our CSV manifest for the clips of an AudioSet segment list found in AUDIO_DIR."""
    from kdpipe.manifests import read_audioset_segments, write_csv_manifest

    clips = read_audioset_segments(segments, audio_dir, split)
    present = [clip for clip in clips if clip.audio.is_file()]
    write_csv_manifest(present, output)
    console.info(f"{len(present)} of {len(clips)} segments have audio in {audio_dir}; "
                 f"{len(clips) - len(present)} missing")
    console.out.print(str(output))
