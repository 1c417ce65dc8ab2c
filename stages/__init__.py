"""The stages of a run, in order. Each module is thin: it composes the library."""

from pipeline.config import Config
from pipeline.stage import Stage
from stages import prepare


def build_stages(config: Config) -> list[Stage]:
    """Every stage the config asks for, upstream first."""
    return [prepare.STAGE]
