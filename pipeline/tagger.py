"""A trained tagger ready to run: the network, its frontend, its class names, and the audio it expects.

`load_tagger` finds the model a user names: the run's student (the one train-student kept), a
teacher of the config (its checkpoint, or its train-teacher output), or a checkpoint file with its
registry architecture (e.g. EfficientAT's mn10_as.pt). It never trains anything: a stage that is not
built is an error naming the command that builds it. `kdpipe predict` and `kdpipe export` share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.classes import ClassList, read_class_list
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.frontends import build_frontend
from kdpipe.models import create_model
from kdpipe.models.windowing import clip_forward
from kdpipe.runner import Pipeline
from kdpipe.stage_names import PREPARE, student, train_teacher
from kdpipe.students import trained_student
from kdpipe.teachers import checkpoint_paths, load_teacher
from kdpipe.training import at_kept_epoch
from kdpipe.waveform_store import STORE_FILE, WaveformStore

STUDENT = "student"


@dataclass(frozen=True)
class Tagger:
    """A model in eval mode with the frontend it was trained with, on one device."""

    name: str  # "student", a teacher's name, or the checkpoint file's stem
    model: nn.Module
    frontend: nn.Module  # waveforms at `sample_rate` -> the model's input
    frontend_config: dict[str, Any]
    classes: ClassList
    sample_rate: int  # the store's rate: what the frontend takes
    clip_seconds: float  # the training clip length
    device: torch.device

    @property
    def clip_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    @torch.inference_mode()
    def logits(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, samples) float waveforms in [-1, 1] -> (batch, classes) fp32 logits on the CPU."""
        features = self.frontend(waveforms.to(self.device).float())
        return clip_forward(self.model, features).float().cpu()


def load_tagger(pipeline: Pipeline, model: str = STUDENT, arch: str | None = None,
                device: torch.device | None = None, build: bool = False) -> Tagger:
    """The tagger `model` names: "student", a teacher's name, or a checkpoint file (with `arch`).

    With `build`, the stages it comes from are brought up to date first; without, they must be built.
    """
    config = pipeline.config
    teachers = {teacher.label: teacher for teacher in config.teachers}
    if arch is not None and (model == STUDENT or model in teachers):
        raise ConfigError(f"--arch goes with a checkpoint file; {model!r} takes its architecture from the config")
    frontend_overrides: dict[str, Any] = {}
    try:
        if model == STUDENT:
            network, name = _student(pipeline, build), STUDENT
        elif model in teachers:
            network, name = _teacher(pipeline, model, build), model
            frontend_overrides = dict(teachers[model].frontend)
        else:
            network, name = _checkpoint_file(Path(model), arch, sorted(teachers)), Path(model).stem
    except ConfigError:
        raise
    except KdpipeError as exc:  # a checkpoint that does not fit its architecture: the user named the wrong pair
        raise ConfigError(str(exc)) from None
    classes = run_classes(pipeline, build)
    device = device or torch.device("cpu")
    frontend_config = {**network.frontend_config, **frontend_overrides}
    tagger = Tagger(name, network.eval().to(device),
                    build_frontend(frontend_config, config.data.sample_rate).eval().to(device),
                    frontend_config, classes, config.data.sample_rate, config.data.clip_seconds, device)
    outputs = tagger.logits(torch.zeros(1, tagger.clip_samples)).shape[1]
    if outputs != len(classes):
        raise ConfigError(f"{name} predicts {outputs} classes but the class list has {len(classes)}: set "
                          "data.class_list to the list it was trained on (AudioSet's class_labels_indices.csv "
                          "for the published checkpoints)")
    return tagger


def run_classes(pipeline: Pipeline, build: bool = False) -> ClassList:
    """The run's classes: `data.class_list`, else the labels the prepared store found."""
    config = pipeline.config
    if config.data.class_list is not None:
        return read_class_list(config.data.class_list)
    if build or pipeline.status(PREPARE).state == "fresh":
        return WaveformStore.open(pipeline.output(PREPARE, build) / STORE_FILE).classes
    raise ConfigError("no class names: set data.class_list (e.g. --set data.class_list=class_labels_indices.csv) "
                      "or run `kdpipe prepare` first")


def _student(pipeline: Pipeline, build: bool) -> nn.Module:
    """The run's student: the KD student, or the baseline when KD is off."""
    name = student(pipeline.config.student.kd.enabled)
    if name not in pipeline.stages:
        raise ConfigError("this config has no student: student.kd.enabled is true but teachers is empty")
    return trained_student(pipeline.output(name, build), pipeline.config.student, len(run_classes(pipeline, build)))


def _teacher(pipeline: Pipeline, name: str, build: bool) -> nn.Module:
    teacher = pipeline.config.teacher(name)
    if teacher.arch is None:
        raise ConfigError(f"teacher {name} is imported logits: there is no model to run")
    upstream = {}
    if teacher.trainable:
        upstream[train_teacher(name)] = pipeline.output(train_teacher(name), build)
    return load_teacher(teacher.arch, checkpoint_paths(teacher, upstream), teacher.options)


def _checkpoint_file(path: Path, arch: str | None, teachers: list[str]) -> nn.Module:
    if not path.is_file():
        known = ", ".join([STUDENT, *teachers])
        raise ConfigError(f"--model {path}: not a model of this config ({known}) nor a checkpoint file")
    if arch is None:
        raise ConfigError(f"--model {path}: a checkpoint file needs --arch, its registry name (see `kdpipe models`)")
    return at_kept_epoch(create_model(arch, checkpoint=path), path.parent)
