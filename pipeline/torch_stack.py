"""The torch / torchaudio / torchvision trio kdpipe is tested with, and one clear error when it is broken.

The three ship compiled code built against each other: torchaudio 2.11.1 beside torch 2.11.0
fails to load (`undefined symbol`), and a mismatched torchvision fails inside timm's import.
pyproject.toml pins the trio exactly; this module reads those pins from kdpipe's installed
metadata (one source of truth), and turns a failed import of any of the three into a
`TorchStackError` that names the installed versions, the required ones and the command that
fixes them, instead of a traceback from deep inside the import.
"""

from __future__ import annotations

import re
import traceback
from importlib import metadata

from kdpipe.errors import KdpipeError

TRIO = ("torch", "torchaudio", "torchvision")


class TorchStackError(KdpipeError):
    """The installed torch, torchaudio or torchvision cannot be loaded."""


def required_versions() -> dict[str, str]:
    """The exact pins of the trio in kdpipe's own requirements (pyproject.toml), e.g. {"torch": "2.11.0"}."""
    try:
        requirements = metadata.requires("kdpipe") or []
    except metadata.PackageNotFoundError:
        return {}
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;,]+)\s*", requirement)
        if match and match[1].lower() in TRIO:
            pins[match[1].lower()] = match[2]
    return pins


def installed_versions() -> dict[str, str | None]:
    """The trio's versions as found on sys.path (None when not installed)."""
    versions: dict[str, str | None] = {}
    for package in TRIO:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def mismatches() -> list[str]:
    """'torchaudio 2.11.1 (kdpipe needs 2.11.0)' for every member that differs from its pin.

    A local build label (`2.11.0+cu130`, `2.11.0+cpu`) is the same release as its pin.
    """
    found = installed_versions()
    return [f"{package} {found[package]} (kdpipe needs {pin})" for package, pin in required_versions().items()
            if (found[package] or "").split("+")[0] != pin]


def fix_command() -> str:
    pins = required_versions()
    return "pip install " + " ".join(f"{package}=={pins[package]}" for package in TRIO if package in pins)


def broken_member(exc: BaseException) -> str | None:
    """The trio member whose import raised `exc` (or an exception it chains from), if one did.

    An exception counts when the package's own `__init__.py` is on its traceback: it was raised
    while that package was being imported, which is where a build mismatch shows. The text of
    the whole chain is read, so a failure inside a worker process (whose traceback reaches the
    parent as text) is recognised too.
    """
    text = "".join(traceback.format_exception(exc))
    found = re.findall(r"[/\\](" + "|".join(TRIO) + r")[/\\]__init__\.py\"", text)
    return found[-1] if found else None


def stack_error(package: str, exc: BaseException) -> TorchStackError:
    """One message: what failed, the installed and required versions, and the fix."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    symbol = re.search(r"undefined symbol: \S+", "".join(traceback.format_exception(exc)))
    if symbol and symbol[0] not in reason:
        reason += f"; {symbol[0]}"
    found = installed_versions()
    pins = required_versions()
    installed = ", ".join(f"{name} {found[name] or 'not installed'}" for name in TRIO)
    needed = ", ".join(f"{name}=={pins[name]}" for name in TRIO if name in pins) or "the pinned trio"
    return TorchStackError(
        f"{package} cannot be loaded ({reason}). Installed: {installed}; kdpipe needs {needed} "
        f"(the three are built against each other). Fix: {fix_command()}"
    )
