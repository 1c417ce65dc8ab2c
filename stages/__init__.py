"""The stages of a run, in order. Each module is thin: it composes the library, and its `stages(config)`
returns the stages it contributes for a config (none, one, or one per teacher)."""

from kdpipe.config import Config
from kdpipe.stage import Stage
from kdpipe.stages import evaluate, extract_teachers, prepare, train_student, train_teacher


def build_stages(config: Config) -> list[Stage]:
    """Every stage the config asks for, upstream first: prepare; train-teacher per teacher without a
    checkpoint; extract per teacher and their ensemble; the KD student and/or the no-KD baseline; evaluate."""
    return [stage for module in (prepare, train_teacher, extract_teachers, train_student, evaluate)
            for stage in module.stages(config)]
