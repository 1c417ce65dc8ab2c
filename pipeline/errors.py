"""Errors a user can act on. The CLI prints them without a traceback.

Exit codes follow the CLI convention: 1 for a failed run, 2 for a usage or
configuration error.
"""


class KdpipeError(Exception):
    """A failure caused by the user's data, files or environment, not by a bug."""

    exit_code = 1


class ConfigError(KdpipeError):
    """An invalid config value, unknown key or missing input file."""

    exit_code = 2


class LockBusy(KdpipeError):
    """Another process is building the same stage output."""
