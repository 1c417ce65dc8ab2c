"""PaSST and AST teachers: checkpoint key contracts (shapes from the reference notes), loading, patchout, windowing.

Full-size models are built on the meta device for key/shape checks (no memory,
no init) and for real only where tensors must round-trip; only tiny models run forward.
"""

import pytest
import torch

from kdpipe.models.ast import AST, AST_CONFIGS, infer_ast_config, strip_module_prefix
from kdpipe.models.passt import PASST_CONFIGS, PaSST, infer_passt_config
from kdpipe.models.windowing import windowed_forward


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def block_shapes(prefix: str, depth: int, dim: int = 768) -> dict[str, tuple[int, ...]]:
    """timm Block parameters as in both teachers' checkpoints (qkv with bias, MLP ratio 4)."""
    per_block = {
        "norm1.weight": (dim,), "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
        "norm2.weight": (dim,), "norm2.bias": (dim,),
        "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
        "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,),
    }
    return {f"{prefix}blocks.{i}.{k}": s for i in range(depth) for k, s in per_block.items()}


def build(cls, config: dict, device: str = "meta", **overrides):
    with torch.device(device):
        return cls(**{**config, **overrides})


def filled(cls, config: dict) -> torch.nn.Module:
    """A full-size model with random CPU tensors, without the seconds its proper init takes."""
    model = build(cls, config).to_empty(device="cpu")
    torch.manual_seed(0)
    for tensor in model.state_dict().values():
        tensor.normal_()
    return model


def load_into_meta_model(cls, config: dict, state: dict) -> torch.nn.Module:
    """Strict load the way a teacher loader should: no init, checkpoint tensors adopted as they are."""
    model = build(cls, config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


# ------------------------------------------------------------------ PaSST keys
PASST_S10 = {
    "patch_embed.proj.weight": (768, 1, 16, 16), "patch_embed.proj.bias": (768,),
    "cls_token": (1, 1, 768), "dist_token": (1, 1, 768),
    "new_pos_embed": (1, 2, 768), "freq_new_pos_embed": (1, 768, 12, 1), "time_new_pos_embed": (1, 768, 1, 99),
    **block_shapes("", 12),
    "norm.weight": (768,), "norm.bias": (768,),
    "head.0.weight": (768,), "head.0.bias": (768,), "head.1.weight": (527, 768), "head.1.bias": (527,),
    "head_dist.weight": (527, 768), "head_dist.bias": (527,),
}


def test_passt_s10_keys_shapes_and_size():
    model = build(PaSST, PASST_CONFIGS["passt_s_s10"])
    assert shapes(model) == PASST_S10  # same keys (no pos_embed, no pre_logits) and shapes
    assert n_params(model) == 86_153_758  # notes: ~86.15 M
    assert model.norm.eps == 1e-6 and model.head[0].eps == 1e-5
    assert all(b.norm1.eps == 1e-6 and b.attn.qkv.bias is not None for b in model.blocks)
    assert model.frontend_config == {"kind": "mel", "sample_rate": 32000, "n_mels": 128, "hop_length": 320}


@pytest.mark.parametrize(
    "name, freq, time, depth",
    [
        ("passt_s_s12", 10, 83, 12),
        ("passt_s_s14", 9, 71, 12),
        ("passt_s_s16", 8, 62, 12),
        # The notes derive 199 / 299, but the releases are built with input_tdim 2000 / 3000
        # and PaSST's grid rule (input // stride) gives 200 / 300.
        ("passt_s_20sec", 12, 200, 12),
        ("passt_s_30sec", 12, 300, 12),
        ("passt_l_s10", 12, 99, 7),
    ],
)
def test_passt_variant_shapes(name, freq, time, depth):
    model_shapes = shapes(build(PaSST, PASST_CONFIGS[name]))
    assert model_shapes["freq_new_pos_embed"] == (1, 768, freq, 1)
    assert model_shapes["time_new_pos_embed"] == (1, 768, 1, time)
    assert sum(k.endswith("mlp.fc1.weight") for k in model_shapes) == depth


def test_passt_l_size():
    assert n_params(build(PaSST, PASST_CONFIGS["passt_l_s10"])) == 50_714_398  # notes: ~50.7 M


# -------------------------------------------------------------------- AST keys
AST_10_10 = {
    "v.cls_token": (1, 1, 768), "v.dist_token": (1, 1, 768), "v.pos_embed": (1, 1214, 768),
    "v.patch_embed.proj.weight": (768, 1, 16, 16), "v.patch_embed.proj.bias": (768,),
    **block_shapes("v.", 12),
    "v.norm.weight": (768,), "v.norm.bias": (768,),
    "v.head.weight": (1000, 768), "v.head.bias": (1000,),
    "v.head_dist.weight": (1000, 768), "v.head_dist.bias": (1000,),
    "mlp_head.0.weight": (768,), "mlp_head.0.bias": (768,),
    "mlp_head.1.weight": (527, 768), "mlp_head.1.bias": (527,),
}


def test_ast_10_10_keys_shapes_and_size():
    model = build(AST, AST_CONFIGS["ast_10_10"])
    assert shapes(model) == AST_10_10
    unused = n_params(model.v.head) + n_params(model.v.head_dist)
    assert n_params(model) == 88_132_063  # notes: 88.1 M stored
    assert n_params(model) - unused == 86_594_063  # notes: 86.6 M used
    assert model.frontend_config == {
        "kind": "fbank", "sample_rate": 16000, "n_mels": 128, "target_frames": 1024,
        "norm_mean": -4.2677393, "norm_std": pytest.approx(9.1379948),
    }


@pytest.mark.parametrize("name, tokens", [("ast_12_12", 852), ("ast_14_14", 659), ("ast_16_16", 514)])
def test_ast_pos_embed_lengths(name, tokens):
    assert shapes(build(AST, AST_CONFIGS[name]))["v.pos_embed"] == (1, tokens, 768)


# --------------------------------------------------------------------- loading
def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_passt_checkpoint_round_trip(tmp_path):
    model = filled(PaSST, PASST_CONFIGS["passt_s_s10"])
    torch.save(model.state_dict(), tmp_path / "passt.pt")
    loaded = torch.load(tmp_path / "passt.pt", weights_only=True)
    rebuilt = load_into_meta_model(PaSST, infer_passt_config(loaded), loaded)
    assert_same_tensors(rebuilt.state_dict(), model.state_dict())


def test_ast_dataparallel_checkpoint_loads_after_stripping(tmp_path):
    model = filled(AST, AST_CONFIGS["ast_10_10"])
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "audioset_10_10.pth")
    loaded = torch.load(tmp_path / "audioset_10_10.pth", weights_only=True)
    config = infer_ast_config(loaded)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_into_meta_model(AST, config, loaded)
    rebuilt = load_into_meta_model(AST, config, strip_module_prefix(loaded))
    assert_same_tensors(rebuilt.state_dict(), model.state_dict())


@pytest.mark.parametrize("name", list(PASST_CONFIGS))
def test_infer_passt_config(name):
    state = build(PaSST, PASST_CONFIGS[name], num_classes=200).state_dict()
    config = infer_passt_config(state)
    assert config["fstride"] == config["tstride"] == PASST_CONFIGS[name]["fstride"]
    assert config["num_classes"] == 200
    assert config["num_heads"] == PASST_CONFIGS[name].get("num_heads", 12)
    assert shapes(build(PaSST, config)) == {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name", list(AST_CONFIGS))
def test_infer_ast_config(name):
    model = build(AST, AST_CONFIGS[name])
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    config = infer_ast_config(prefixed, input_tdim=model.input_tdim)
    defaults = {"num_classes": 527, "input_fdim": 128, "input_tdim": 1024, "embed_dim": 768, "depth": 12,
                "num_heads": 12, "imagenet_classes": 1000}
    assert config == {**defaults, **AST_CONFIGS[name]}
    assert shapes(build(AST, config)) == shapes(model)


def test_infer_ast_config_needs_the_right_input_length():
    speech = build(AST, AST_CONFIGS["ast_10_10"], input_tdim=128, num_classes=35).state_dict()
    assert speech["v.pos_embed"].shape[1] == 12 * 12 + 2
    assert infer_ast_config(speech, input_tdim=128)["fstride"] == 10
    with pytest.raises(ValueError, match="matches strides"):
        infer_ast_config(speech)  # 146 tokens fit no stride at 1024 frames


# ----------------------------------------------------------------- behaviour
@pytest.fixture
def tiny_passt() -> PaSST:
    torch.manual_seed(0)
    return PaSST(**PASST_CONFIGS["passt_tiny"], num_classes=10)


def sequence_length(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Tokens entering the first transformer block."""
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    model(x)
    handle.remove()
    return seen[0]


def test_patchout_only_in_training(tiny_passt):
    x = torch.randn(2, 1, 128, 400)  # 8 x 25 patches
    tiny_passt.u_patchout = 3
    tiny_passt.train()
    assert sequence_length(tiny_passt, x) == 2 + (8 - 1) * (25 - 4) - 3
    tiny_passt.eval()
    assert sequence_length(tiny_passt, x) == 2 + 8 * 25
    with torch.no_grad():
        assert torch.equal(tiny_passt(x), tiny_passt(x))


def test_passt_short_input_uses_the_first_time_embeddings(tiny_passt):
    tiny_passt.eval()
    short = build(PaSST, PASST_CONFIGS["passt_tiny"], device="cpu", num_classes=10, input_tdim=160)  # 10 patches
    state = tiny_passt.state_dict()
    state["time_new_pos_embed"] = state["time_new_pos_embed"][..., :10]
    short.load_state_dict(state)
    short.eval()
    x = torch.randn(1, 1, 128, 160)
    with torch.no_grad():
        torch.testing.assert_close(tiny_passt(x), short(x))
        with pytest.raises(ValueError, match="windowing"):
            tiny_passt(torch.randn(1, 1, 128, tiny_passt.max_frames + 1))
        tiny_passt(torch.randn(1, 1, 128, tiny_passt.max_frames))


@pytest.mark.parametrize(
    "cls, config, frames", [(PaSST, PASST_CONFIGS["passt_tiny"], 300), (AST, AST_CONFIGS["ast_tiny"], 256)]
)
def test_tiny_forward_shapes(cls, config, frames):
    model = cls(**config, num_classes=10).eval()
    with torch.no_grad():
        logits, embedding = model(torch.randn(3, 1, 128, frames), return_embedding=True)
        assert model(torch.randn(3, 1, 128, frames)).shape == logits.shape == (3, 10)
    assert embedding.shape == (3, 128) and logits.isfinite().all()


def test_ast_rejects_other_input_sizes():
    model = AST(**AST_CONFIGS["ast_tiny"]).eval()
    with pytest.raises(ValueError, match="pad shorter inputs"):
        model(torch.randn(1, 1, 128, 200))


def test_windowed_forward_averages_windows(tiny_passt):
    tiny_passt.eval()
    x = torch.randn(2, 1, 128, 950)
    with torch.no_grad():
        # No padding: windows at 0 and 300, plus one aligned to the end for the tail.
        manual = torch.stack([tiny_passt(x[..., s : s + 400]) for s in (0, 300, 550)]).mean(0)
        torch.testing.assert_close(windowed_forward(tiny_passt, x, 400, 300, pad=False), manual)
        # Reflect padding by half a window each side (1350 frames), hop 475: starts 0, 475, 950.
        padded = torch.nn.functional.pad(x, (200, 200, 0, 0), mode="reflect")
        outputs = [tiny_passt(padded[..., s : s + 400], return_embedding=True) for s in (0, 475, 950)]
        logits, embedding = windowed_forward(tiny_passt, x, 400, 475, return_embedding=True)
        torch.testing.assert_close(logits, torch.stack([o[0] for o in outputs]).mean(0))
        torch.testing.assert_close(embedding, torch.stack([o[1] for o in outputs]).mean(0))
        # Defaults: window = the model's longest input, hop a quarter of it; short inputs pass through.
        assert windowed_forward(tiny_passt, x).shape == (2, 10)
        short = x[..., :300]
        torch.testing.assert_close(windowed_forward(tiny_passt, short), tiny_passt(short))


def test_windowed_forward_on_ast():
    model = AST(**AST_CONFIGS["ast_tiny"], num_classes=5).eval()
    x = torch.randn(1, 1, 128, 600)
    with torch.no_grad():
        manual = torch.stack([model(x[..., s : s + 256]) for s in (0, 200, 344)]).mean(0)
        torch.testing.assert_close(windowed_forward(model, x, hop_frames=200, pad=False), manual)
