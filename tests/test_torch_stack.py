"""The installed torch trio and the lock: checked first, so a drifted environment fails here, readably."""

import json
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
    assert not unlocked, f"constraints.txt lacks {unlocked}: regenerate it (docs/development.md)"
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


# Runs kdpipe's CLI once per argument list in ONE fresh interpreter (each `python -m kdpipe` costs seconds of
# imports): prints each command's exit status to stdout and a marker line to stderr before each command, so
# every command's stderr is read on its own. A failed import is not cached (Python drops the half-imported
# module), so each command meets the broken torchaudio afresh, as it would in a process of its own.
DRIVER = """
import json, sys
from kdpipe.cli import app
codes = []
for args in json.loads(sys.argv[1]):
    print(f"=== kdpipe {' '.join(args)}", file=sys.stderr, flush=True)
    try:
        app(args, prog_name="kdpipe")
    except SystemExit as exit:
        codes.append(exit.code or 0)
    else:
        codes.append(0)
    sys.stderr.flush()
print(json.dumps(codes))
"""


def kdpipe(commands: list[list[str]], cwd: Path, python_path: Path) -> list[tuple[int, str]]:
    """Each command's (exit status, stderr), all run by DRIVER in one new interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(python_path), str(ROOT)]), "COLUMNS": "500"}
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    codes = json.loads(result.stdout.splitlines()[-1])
    stderrs = re.split(r"^=== kdpipe .*\n", result.stderr, flags=re.M)[1:]
    assert len(codes) == len(stderrs) == len(commands), result.stderr
    return list(zip(codes, stderrs))


def test_a_broken_torchaudio_is_one_clear_message_and_the_cli_still_answers(tmp_path, small_demo):
    broken = fake_broken_torchaudio(tmp_path / "site")
    pins = torch_stack.required_versions()
    config = tmp_path / "kdpipe.yaml"
    config.write_text(f"cache_dir: {tmp_path / 'cache'}\ndata:\n  clip_seconds: 1.0\n  class_list: {small_demo.class_list}\n"
                      f"  sources:\n    - path: {small_demo.manifest}\nprepare:\n  workers: 1\n")
    answers = [["--help"], ["--version"], ["config", "show"], ["status"]]
    *answered, (code, stderr) = kdpipe([*answers, ["prepare"]], tmp_path, broken)
    for args, (status, err) in zip(answers, answered):
        assert status == 0, (args, err)
    assert code == 1, stderr
    assert "Traceback" not in stderr and stderr.count("error:") == 1, stderr
    message = " ".join(stderr.split())
    assert "torchaudio cannot be loaded" in message and "undefined symbol" in message
    assert f"torchaudio 2.11.1, torchvision {metadata.version('torchvision')}" in message
    assert f"kdpipe needs torch=={pins['torch']}, torchaudio=={pins['torchaudio']}" in message
    assert f"Fix: pip install torch=={pins['torch']} torchaudio=={pins['torchaudio']} " \
           f"torchvision=={pins['torchvision']}" in message
