"""The stages of a run, in order. Each module is thin: it composes the library."""

from kdpipe.config import Config
from kdpipe.stage import Stage
from kdpipe.stages import evaluate, extract_teachers, prepare, train_student, train_teacher


def build_stages(config: Config) -> list[Stage]:
    """Every stage the config asks for, upstream first.

    One train-teacher per model teacher without a checkpoint, one extract per teacher,
    the ensemble over all of them, the student (KD needs teachers; the baseline does not),
    and the evaluation of all of them.
    """
    stages = [prepare.STAGE]
    stages += [train_teacher.stage_for(t) for t in config.teachers if t.trainable]
    stages += [extract_teachers.teacher_stage(t) for t in config.teachers]
    if config.teachers:
        stages.append(extract_teachers.ensemble_stage(config))
    if train_student.available(config):
        stages.append(train_student.stage(config))
    if evaluate.available(config):
        stages.append(evaluate.stage(config))
    return stages
