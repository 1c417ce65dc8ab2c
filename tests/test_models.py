"""The model registry: names, strict checkpoint loading, mismatch explanations, shape inference."""

import pytest
import torch
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.errors import KdpipeError
from kdpipe.models import create_model, list_models, load_checkpoint, load_for_finetuning, read_state_dict
from kdpipe.models.ast import AST
from kdpipe.models.dymn import DyMN
from kdpipe.models.mobilenet import MobileNetV3
from kdpipe.models.passt import PaSST


def test_every_name_builds_the_right_family():
    names = list_models()
    assert {f"mn{n:02d}" for n in (1, 2, 4, 5, 6, 8, 10, 12, 14, 16, 20, 30, 40)} <= set(names)
    assert {"passt_s_s10", "passt_s_s16", "ast_10_10", "ast_16_16", "passt_tiny", "ast_tiny", "mn_tiny",
            "mobilenetv3", "dymn04", "dymn10", "dymn20", "dymn", "dymn_tiny"} <= set(names)
    with torch.device("meta"):
        for name in names:
            model = create_model(name)
            family = {"m": MobileNetV3, "d": DyMN, "p": PaSST, "a": AST}[name[0]]
            assert isinstance(model, family), name
            assert {"kind", "sample_rate", "n_mels"} <= set(model.frontend_config)
    assert create_model("mobilenetv3", width=2.5).width == 2.5
    assert create_model("dymn", width=0.6).width == 0.6


def test_unknown_name_suggests_close_ones():
    with pytest.raises(KdpipeError, match="did you mean passt_s_s10"):
        create_model("passt_s10")


def test_checkpoint_with_module_prefix_loads_strictly(tmp_path):
    model = create_model("ast_tiny", num_classes=5)
    path = tmp_path / "audioset_tiny.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    fresh = load_checkpoint(create_model("ast_tiny", num_classes=5), path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


def test_wrong_width_is_explained(tmp_path):
    path = tmp_path / "mn20_as.pt"
    torch.save(create_model("mn20", num_classes=7).state_dict(), path)
    with pytest.raises(KdpipeError) as info:
        load_checkpoint(create_model("mn10", num_classes=7), path)
    message = str(info.value)
    assert "features.0.0.weight: checkpoint (32, 1, 3, 3), model (16, 1, 3, 3)" in message
    assert "width 2" in message


def test_wrong_class_count_is_explained(tmp_path):
    path = tmp_path / "mn.pt"
    torch.save(create_model("mn_tiny", num_classes=7).state_dict(), path)
    with pytest.raises(KdpipeError, match="number of classes"):
        load_checkpoint(create_model("mn_tiny", num_classes=9), path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = create_model("mn_tiny", num_classes=7).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["classifier.5.bias"]
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(KdpipeError) as info:
        load_checkpoint(create_model("mn_tiny", num_classes=7), path)
    assert "1 missing key(s): classifier.5.bias" in str(info.value)
    assert "1 unexpected key(s): extra.weight" in str(info.value)


def test_stride_is_read_from_the_checkpoint_not_the_name(tmp_path):
    source = create_model("passt_tiny", fstride=10, tstride=10, num_classes=4)
    path = tmp_path / "passt-s-f128-p16-s16-ap.pt"  # the name lies about the stride
    torch.save(source.state_dict(), path)
    with pytest.raises(KdpipeError, match="stride"):
        load_checkpoint(create_model("passt_tiny", num_classes=4), path)
    loaded = create_model("passt_tiny", checkpoint=path)
    assert loaded.state_dict()["freq_new_pos_embed"].shape == source.state_dict()["freq_new_pos_embed"].shape
    x = torch.randn(2, 1, 128, 300)
    source.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), source(x))


def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(KdpipeError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(KdpipeError, match="not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "garbage.pt")


def test_models_command_prints_published_figures():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    line = next(row for row in result.output.splitlines() if "│ mn10 " in row)
    assert "4.877 M" in line and "0.541 G" in line
    assert "passt_s_s10" in result.output and "ast_10_10" in result.output


def test_imagenet_weights_start_an_audioset_student(tmp_path):
    """An mn10_im-shaped file (EfficientAT's keys, 1,000 ImageNet classes): the head's last layer starts afresh,
    everything else loads strictly and equals the file."""
    torch.manual_seed(1)
    imagenet = create_model("mn10", num_classes=1000).state_dict()
    torch.save(imagenet, tmp_path / "mn10_im.pt")
    torch.manual_seed(2)
    student = create_model("mn10", num_classes=527)
    fresh_head = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("classifier.5.")}
    assert load_for_finetuning(student, tmp_path / "mn10_im.pt") == ["classifier.5"]
    for key, value in student.state_dict().items():
        expected = fresh_head[key] if key in fresh_head else imagenet[key]
        assert torch.equal(value, expected), key
    same_classes = create_model("mn10", num_classes=1000)
    assert load_for_finetuning(same_classes, tmp_path / "mn10_im.pt") == []  # nothing to start afresh
    assert all(torch.equal(value, imagenet[key]) for key, value in same_classes.state_dict().items())


def test_finetuning_restarts_only_heads(tmp_path):
    torch.save(create_model("passt_tiny", num_classes=5).state_dict(), tmp_path / "passt.pt")
    assert load_for_finetuning(create_model("passt_tiny", num_classes=3), tmp_path / "passt.pt") == [
        "head.1", "head_dist"]
    torch.save(create_model("dymn_tiny", num_classes=1000).state_dict(), tmp_path / "dymn_im.pt")
    assert load_for_finetuning(create_model("dymn_tiny", num_classes=10), tmp_path / "dymn_im.pt") == ["classifier.5"]
    # A body that differs is never started afresh: the strict load's error, with its likely cause.
    with pytest.raises(KdpipeError, match="another architecture: its keys start with layers, in_c, out_c, classifier"):
        load_for_finetuning(create_model("mobilenetv3", width=0.2, num_classes=3), tmp_path / "dymn_im.pt")
    torch.save(create_model("mn_tiny", num_classes=7).state_dict(), tmp_path / "mn.pt")
    with pytest.raises(KdpipeError, match="a different width"):
        load_for_finetuning(create_model("mobilenetv3", width=0.2, num_classes=3), tmp_path / "mn.pt")
