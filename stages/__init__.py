"""The stages of a run, in order. Each module is thin: it composes the library."""

from pipeline.config import Config
from pipeline.stage import Stage
from stages import prepare, train_teacher


def build_stages(config: Config) -> list[Stage]:
    """Every stage the config asks for, upstream first: one train-teacher per teacher without a checkpoint."""
    return [
        prepare.STAGE,
        *(train_teacher.stage_for(teacher) for teacher in config.teachers if teacher.checkpoint is None),
    ]
