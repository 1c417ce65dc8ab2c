"""The installed torch trio and the lock: checked first, so a drifted environment fails here, readably."""

import math
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch
from packaging.requirements import Requirement

from kdpipe import frontends, torch_stack

ROOT = Path(__file__).resolve().parents[1]


def lock() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_installed_trio_is_the_pinned_one():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {f"{name}=={version}" for name, version in torch_stack.required_versions().items()} <= set(declared)
    assert set(torch_stack.required_versions()) == set(torch_stack.TRIO)
    assert torch_stack.mismatches() == [], (
        f"this environment's torch stack is not the one kdpipe pins; fix: {torch_stack.fix_command()}")


def requirement_closure() -> set[str]:
    """kdpipe[dev]'s requirements, transitively, for this platform (normalised names)."""
    todo = [("kdpipe", {"dev"})]
    seen: set[str] = set()
    while todo:
        name, extras = todo.pop()
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            key = normalise(requirement.name)
            if key not in seen:
                seen.add(key)
                todo.append((requirement.name, set(requirement.extras)))
    return seen


def test_lock_covers_every_dependency_and_is_what_is_installed():
    pins = lock()
    assert {name: pins[name] for name in torch_stack.TRIO} == torch_stack.required_versions()
    closure = requirement_closure()
    unlocked = sorted(closure - set(pins))
    assert not unlocked, f"constraints.txt lacks {unlocked}: regenerate it (README, 'Installing')"
    drifted = [f"{name} {metadata.version(name)} (lock: {pins[name]})" for name in sorted(closure)
               if metadata.version(name).split("+")[0] != pins[name]]
    assert not drifted, f"installed packages differ from constraints.txt: {drifted}; install with -c constraints.txt"


def test_torchaudio_native_code_and_our_frontends_run():
    import torchaudio
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as taf

    assert torchaudio._extension._IS_TORCHAUDIO_EXT_AVAILABLE, "libtorchaudio did not load"
    # lfilter's core loop is compiled code in libtorchaudio; scipy is an independent implementation.
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(2000)
    b, a = scipy.signal.butter(4, 0.2)
    ours = taf.lfilter(torch.from_numpy(signal), torch.from_numpy(a), torch.from_numpy(b), clamp=False)
    np.testing.assert_allclose(ours.numpy(), scipy.signal.lfilter(b, a, signal), atol=1e-9)
    # Resampling: a 1 kHz tone at 44.1 kHz keeps its frequency at 32 kHz, and the length is ceil(n * 32 / 44.1).
    tone = np.sin(2 * np.pi * 1000 * np.arange(44100) / 44100).astype(np.float32)
    resampled = frontends.resample(tone, 44100, 32000)
    assert len(resampled) == math.ceil(44100 * 32000 / 44100)
    assert np.argmax(np.abs(np.fft.rfft(resampled))) * 32000 / len(resampled) == pytest.approx(1000, abs=1)
    # Kaldi fbank: 25 ms frames every 10 ms over 1 s of 16 kHz audio give 98 frames, all finite.
    fbank = kaldi.fbank(torch.from_numpy(tone[:16000]).unsqueeze(0), num_mel_bins=64, sample_frequency=16000,
                        dither=0.0, window_type="hanning", htk_compat=True, use_energy=False)
    assert fbank.shape == (98, 64) and torch.isfinite(fbank).all()


def fake_broken_torchaudio(root: Path) -> Path:
    """A torchaudio 2.11.1 that fails to import as the real one does beside torch 2.11.0."""
    package = root / "torchaudio"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise OSError('Could not load this library: /site-packages/torchaudio/lib/libtorchaudio.so') from OSError(\n"
        "    '/site-packages/torchaudio/lib/libtorchaudio.so: undefined symbol: "
        "torch_exception_get_what_without_backtrace')\n")
    info = root / "torchaudio-2.11.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchaudio\nVersion: 2.11.1\n")
    return root


def kdpipe(args: list[str], cwd: Path, python_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(python_path), str(ROOT)]), "COLUMNS": "500"}
    return subprocess.run([sys.executable, "-m", "kdpipe", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_broken_torchaudio_is_one_clear_message_and_the_cli_still_answers(tmp_path, small_demo):
    broken = fake_broken_torchaudio(tmp_path / "site")
    pins = torch_stack.required_versions()
    config = tmp_path / "kdpipe.yaml"
    config.write_text(f"cache_dir: {tmp_path / 'cache'}\ndata:\n  clip_seconds: 1.0\n  class_list: {small_demo.class_list}\n"
                      f"  sources:\n    - path: {small_demo.manifest}\nprepare:\n  workers: 1\n")
    for args in (["--help"], ["--version"], ["config", "show"], ["status"]):
        result = kdpipe(args, tmp_path, broken)
        assert result.returncode == 0, (args, result.stderr)
    result = kdpipe(["prepare"], tmp_path, broken)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1, result.stderr
    message = " ".join(result.stderr.split())
    assert "torchaudio cannot be loaded" in message and "undefined symbol" in message
    assert f"torchaudio 2.11.1, torchvision {metadata.version('torchvision')}" in message
    assert f"kdpipe needs torch=={pins['torch']}, torchaudio=={pins['torchaudio']}" in message
    assert f"Fix: pip install torch=={pins['torch']} torchaudio=={pins['torchaudio']} " \
           f"torchvision=={pins['torchvision']}" in message
