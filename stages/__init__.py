"""The pipeline's stages, in run order. Each module is thin: it composes the library."""

from pipeline.stage import Stage
from stages import prepare

PIPELINE: list[Stage] = [prepare.STAGE]
