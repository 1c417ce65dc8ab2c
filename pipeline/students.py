"""Students: the network a config describes, and the students a finished training kept.

A train-student output folder holds `student.json`, which says how to rebuild the kept student
(its representation and weights file); multi-representation runs also keep plain students
under `students/<representation>.pt`. Evaluation, predict and export read students only here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe import atomic, collaborative, console, frontends
from kdpipe.config import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models import WIDTH_FREE, create_model, load_checkpoint, load_for_finetuning
from kdpipe.training import MODEL, at_kept_epoch

DESCRIPTION = "student.json"


def canonical_arch(arch: str, width: float) -> tuple[str, float | None]:
    """One spelling per student network: a named preset (`mn10`, `dymn04`) is its width-free family entry
    (`mobilenetv3`, `dymn`) at its width, and `student.width` counts for those entries only (None: the arch
    has no width)."""
    for family, presets in WIDTH_FREE.items():
        if arch in presets:
            return family, presets[arch]
    return arch, width if arch in WIDTH_FREE else None


def build_student(student: StudentConfig, num_classes: int, representation: str = "mel") -> nn.Module:
    """The student architecture (`canonical_arch` says what `student.width` means).

    `representation` swaps the model's mel frontend for MFCC or STFT features of the same shape.
    """
    arch, width = canonical_arch(student.arch, student.width)
    extra = {} if width is None else {"width": width}
    model = create_model(arch, **{"num_classes": num_classes, **extra, **student.options})
    if representation != "mel":
        model.frontend_config = frontends.representation_config(model.frontend_config, representation)
    return model


def init_weights(path: Path) -> Path:
    """`student.init` as one weights file: a file as given; a train-student output folder: the student it kept."""
    if not path.is_dir():
        return path
    if (path / DESCRIPTION).is_file():
        return path / json.loads((path / DESCRIPTION).read_text())["weights"]
    if (path / MODEL).is_file():
        return path / MODEL
    raise KdpipeError(f"student.init: {path} is a folder without {DESCRIPTION} or {MODEL}: give a training's "
                      "output folder or a weights file")


def start_from(model: nn.Module, init: Path | None, key: str = "student.init") -> dict[str, Any]:
    """Load `init` into every network of `model` (a student, a teacher, or each member of a group) for training,
    saying which head layers start afresh; the record the stage keeps of it ({} without init)."""
    if init is None:
        return {}
    weights = init_weights(init)
    members = model.students.values() if isinstance(model, collaborative.StudentGroup) else [model]
    fresh = [load_for_finetuning(member, weights) for member in members][0]
    if fresh:
        console.info(f"{key}: {weights}: re-initialised {', '.join(fresh)} (the head of other classes); "
                     "everything else loaded from the file")
    return {"init": {"weights": str(weights), "reinitialised": fresh}}


def build_group(student: StudentConfig, num_classes: int, sample_rate: int
                ) -> tuple[collaborative.StudentGroup, collaborative.RepresentationFrontends]:
    """One student per configured representation, and their frontends."""
    members = {rep: build_student(student, num_classes, rep) for rep in student.representations}
    return (collaborative.StudentGroup(members), collaborative.RepresentationFrontends(
        {rep: frontends.build_frontend(model.frontend_config, sample_rate) for rep, model in members.items()}))


def keep_members(out_dir: Path, group: collaborative.StudentGroup, best_member: str, keep: str) -> str:
    """Write the kept members of the kept epoch as plain students; returns `best_member`'s weights file."""
    state = torch.load(out_dir / MODEL, map_location="cpu", weights_only=True)
    (out_dir / "students").mkdir(exist_ok=True)
    for name in group.member_names if keep == "all" else (best_member,):
        member = collaborative.member_state_dict(state, name)
        atomic.write(out_dir / "students" / f"{name}.pt", lambda tmp: torch.save(member, tmp))
    return f"students/{best_member}.pt"


def describe(out_dir: Path, student: StudentConfig, num_classes: int, representation: str, weights: str
             ) -> nn.Module:
    """Write `student.json` for the kept student (checking its weights load) and return that student."""
    kept = at_kept_epoch(load_checkpoint(build_student(student, num_classes, representation), out_dir / weights),
                         out_dir)
    atomic.write_text(out_dir / DESCRIPTION, json.dumps(
        {"arch": student.arch, "representation": representation, "frontend": kept.frontend_config,
         "weights": weights}, indent=2))
    return kept


def trained_student(out_dir: Path, student: StudentConfig, num_classes: int) -> nn.Module:
    """The kept student of a finished train-student output, weights loaded, `frontend_config` set."""
    description: dict[str, Any] = json.loads((out_dir / DESCRIPTION).read_text())
    model = build_student(student, num_classes, description["representation"])
    return at_kept_epoch(load_checkpoint(model, out_dir / description["weights"]), out_dir)


def kept_students(out_dir: Path, student: StudentConfig, num_classes: int) -> dict[str, nn.Module]:
    """Every student a train-student output kept, by representation, weights loaded: the plain students
    of a multi-representation run (all of them with `student.keep_members: all`), else the one student."""
    kept = {path.stem: at_kept_epoch(load_checkpoint(build_student(student, num_classes, path.stem), path), out_dir)
            for path in sorted((out_dir / "students").glob("*.pt"))}
    return kept or {"mel": trained_student(out_dir, student, num_classes)}
