"""kdpipe export: ONNX and TorchScript files that compute what torch computes at any batch size, and say what
they are."""

import re

import numpy as np
import onnxruntime
import torch
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.export import export_tagger, load_exported, read_metadata
from kdpipe.models import create_model
from kdpipe.tagger import load_tagger
from kdpipe.waveform_store import WaveformStore


def store_clips(trained_run, count: int) -> torch.Tensor:
    """Real audio: the first prepared clips, as float waveforms."""
    store = WaveformStore.open(trained_run.pipeline.ensure("prepare") / "waveforms.zarr")
    return torch.from_numpy(store.read(np.arange(count)).astype(np.float32) / 32768.0)


def test_onnx_student_with_frontend_matches_torch_and_carries_its_classes(trained_run, tmp_path):
    out = tmp_path / "student.onnx"
    result = CliRunner().invoke(app, ["export", "--format", "onnx", "--out", str(out),
                                      *[f"--set={item}" for item in trained_run.settings]])
    assert result.exit_code == 0, result.output
    reported = float(re.search(r"max abs logit difference\s+(\S+)", result.output).group(1))
    assert reported < 1e-4 and result.output.strip().endswith(str(out))

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.name == "waveform" and isinstance(given.shape[0], str) and given.shape[1] == 32000
    student = load_tagger(trained_run.pipeline)
    waves = store_clips(trained_run, 5)  # neither the traced batch size nor the checked ones
    exported = session.run(None, {"waveform": waves.numpy()})[0]
    assert np.abs(exported - student.logits(waves).numpy()).max() < 1e-4

    metadata = read_metadata(out)
    assert metadata["class_names"] == list(student.classes.names) and len(metadata["class_names"]) == 12
    assert metadata["input"] == "waveform" and metadata["sample_rate"] == 32000 and metadata["clip_seconds"] == 1.0
    assert metadata["frontend"]["kind"] == "mel" and metadata["input_shape"] == ["batch", 32000]


def test_onnx_transformer_without_frontend_takes_features(trained_run, tmp_path):
    teacher = load_tagger(trained_run.pipeline, "passt_tiny")
    result = export_tagger(teacher, tmp_path / "passt.onnx", "onnx", with_frontend=False)
    assert result.max_abs_diff < 1e-4
    features = teacher.frontend(store_clips(trained_run, 4))
    assert result.metadata["input"] == "features" and result.metadata["input_shape"] == ["batch", 1, 128, 100]
    exported = load_exported(result.path)(features.numpy())
    assert np.abs(exported - teacher.model(features).detach().numpy()).max() < 1e-4


def test_onnx_resampling_frontend_exports(trained_run, tmp_path):
    """AST's fbank runs at 16 kHz: the graph resamples the 32 kHz input itself."""
    checkpoint = tmp_path / "ast.pt"
    torch.manual_seed(0)
    torch.save(create_model("ast_tiny", num_classes=12).state_dict(), checkpoint)
    ast = load_tagger(trained_run.pipeline, str(checkpoint), "ast_tiny")
    result = export_tagger(ast, tmp_path / "ast.onnx", "onnx")
    assert result.max_abs_diff < 1e-4 and result.metadata["frontend"]["sample_rate"] == 16000
    waves = store_clips(trained_run, 2)
    assert np.abs(load_exported(result.path)(waves.numpy()) - ast.logits(waves).numpy()).max() < 1e-4


def test_torchscript_reloads_with_its_metadata_and_any_batch_size(trained_run, tmp_path):
    teacher = load_tagger(trained_run.pipeline, "passt_tiny")
    result = export_tagger(teacher, tmp_path / "passt.torchscript.pt", "torchscript")
    assert result.max_abs_diff < 1e-4
    waves = store_clips(trained_run, 5)
    reloaded = load_exported(result.path)  # torch.jit.load
    np.testing.assert_allclose(reloaded(waves.numpy()), teacher.logits(waves).numpy(), rtol=0, atol=1e-4)
    assert read_metadata(result.path) == result.metadata
    assert result.metadata["model"] == "passt_tiny" and result.metadata["class_mids"] == list(teacher.classes.mids)
