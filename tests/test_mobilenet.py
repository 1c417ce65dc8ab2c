"""EfficientAT MobileNetV3 students: published sizes, checkpoint key layout, heads, complexity counting.

Expected numbers come from EfficientAT (Schmid et al., ICASSP 2023: its model table) and the
module tree of its released checkpoints.
Size checks build models on the meta device, so even mn40 costs no compute.
"""

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.models.complexity import count_macs
from kdpipe.models.mobilenet import NAME_TO_WIDTH, MobileNetV3, block_configs, make_divisible

# EfficientAT's table: name, width, stem, last-conv out (embedding), MLP hidden, params (M), MACs @ 128x1000 (G).
SIZE_TABLE = [
    ("mn01", 0.1, 8, 96, 128, 0.124, 0.018),
    ("mn02", 0.2, 8, 192, 256, 0.325, 0.040),
    ("mn04", 0.4, 8, 384, 512, 0.984, 0.111),
    ("mn05", 0.5, 8, 480, 640, 1.431, 0.160),
    ("mn06", 0.6, 16, 576, 768, 1.948, 0.223),
    ("mn08", 0.8, 16, 768, 1024, 3.247, 0.367),
    ("mn10", 1.0, 16, 960, 1280, 4.877, 0.541),
    ("mn12", 1.2, 24, 1152, 1536, 6.837, 0.805),
    ("mn14", 1.4, 24, 1344, 1792, 9.141, 1.042),
    ("mn16", 1.6, 24, 1536, 2048, 11.710, 1.323),
    ("mn20", 2.0, 32, 1920, 2560, 17.909, 2.059),
    ("mn30", 3.0, 48, 2880, 3840, 39.086, 4.555),
    ("mn40", 4.0, 64, 3840, 5120, 68.427, 8.028),
]

# Per-block (expanded, out) widths.
BLOCK_WIDTHS = {
    0.4: [(8, 8), (24, 16), (32, 16), (32, 16), (48, 16), (48, 16), (96, 32), (80, 32), (72, 32), (72, 32),
          (192, 48), (272, 48), (272, 64), (384, 64), (384, 64)],
    1.0: [(16, 16), (64, 24), (72, 24), (72, 40), (120, 40), (120, 40), (240, 80), (200, 80), (184, 80), (184, 80),
          (480, 112), (672, 112), (672, 160), (960, 160), (960, 160)],
    2.0: [(32, 32), (128, 48), (144, 48), (144, 80), (240, 80), (240, 80), (480, 160), (400, 160), (368, 160),
          (368, 160), (960, 224), (1344, 224), (1344, 320), (1920, 320), (1920, 320)],
    4.0: [(64, 64), (256, 96), (288, 96), (288, 160), (480, 160), (480, 160), (960, 320), (800, 320), (736, 320),
          (736, 320), (1920, 448), (2688, 448), (2688, 640), (3840, 640), (3840, 640)],
}

# MobileNetV3-Large at w = 1.0: (in, kernel, expanded, out, SE) per block.
MN10_BLOCKS = [
    (16, 3, 16, 16, False), (16, 3, 64, 24, False), (24, 3, 72, 24, False), (24, 5, 72, 40, True),
    (40, 5, 120, 40, True), (40, 5, 120, 40, True), (40, 3, 240, 80, False), (80, 3, 200, 80, False),
    (80, 3, 184, 80, False), (80, 3, 184, 80, False), (80, 3, 480, 112, True), (112, 3, 672, 112, True),
    (112, 5, 672, 160, True), (160, 5, 960, 160, True), (160, 5, 960, 160, True),
]

TEN_SECONDS = (1, 1, 128, 1000)


def meta_model(**kwargs) -> MobileNetV3:
    with torch.device("meta"):
        return MobileNetV3(**kwargs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_name_to_width_covers_the_table():
    assert NAME_TO_WIDTH == {name: width for name, width, *_ in SIZE_TABLE}


@pytest.mark.parametrize(("v", "expected"), [(6.4, 8), (1.6, 8), (12.8, 16), (18, 24), (72 * 0.4, 32), (1280, 1280)])
def test_make_divisible(v, expected):
    assert make_divisible(v, 8) == expected


@pytest.mark.parametrize(("name", "width", "stem", "embed", "hidden", "params_m", "macs_g"), SIZE_TABLE)
def test_published_params_and_macs(name, width, stem, embed, hidden, params_m, macs_g):
    model = meta_model(width=width)
    assert model.features[0][0].out_channels == stem
    assert model.embedding_dim == embed == model.features[16][0].out_channels
    assert model.classifier[2].out_features == hidden
    assert round(n_params(model) / 1e6, 3) == params_m
    assert round(count_macs(model, TEN_SECONDS) / 1e9, 3) == macs_g


@pytest.mark.parametrize(
    ("n_mels", "frames", "macs_g"),
    # README 1.7 hop / mel variants of mn10: hops 480/640/800 samples give 667/500/400 frames.
    [(128, 667, 0.36), (128, 500, 0.27), (128, 400, 0.22), (40, 1000, 0.21), (64, 1000, 0.27), (256, 1000, 1.08)],
)
def test_mn10_frontend_variant_macs(n_mels, frames, macs_g):
    model = meta_model(width=1.0, input_dim_f=n_mels, input_dim_t=frames)
    assert round(count_macs(model, (1, 1, n_mels, frames)) / 1e9, 2) == macs_g


@pytest.mark.parametrize("width", sorted(BLOCK_WIDTHS))
def test_block_widths(width):
    assert [(c.expanded, c.out_channels) for c in block_configs(width)] == BLOCK_WIDTHS[width]
    model = meta_model(width=width)
    assert [blk.block[-1][0].out_channels for blk in model.features[1:16]] == [o for _, o in BLOCK_WIDTHS[width]]


def _conv_bn(prefix: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    bn = {f"{prefix}.1.{k}": (shape[0],) for k in ("weight", "bias", "running_mean", "running_var")}
    return {f"{prefix}.0.weight": shape, **bn, f"{prefix}.1.num_batches_tracked": ()}


def expected_mn10_layout() -> dict[str, tuple[int, ...]]:
    """mn10 state-dict keys and shapes as described in notes 1.8, built independently of the model code."""
    keys = _conv_bn("features.0", (16, 1, 3, 3))
    for i, (c_in, k, exp, out, se) in enumerate(MN10_BLOCKS, start=1):
        j = 0
        if exp != c_in:
            keys |= _conv_bn(f"features.{i}.block.{j}", (exp, c_in, 1, 1))
            j += 1
        keys |= _conv_bn(f"features.{i}.block.{j}", (exp, 1, k, k))
        j += 1
        if se:
            sq = make_divisible(exp // 4, 8)
            p = f"features.{i}.block.{j}.conc_se_layers.0"
            keys |= {f"{p}.fc1.weight": (sq, exp), f"{p}.fc1.bias": (sq,), f"{p}.fc2.weight": (exp, sq),
                     f"{p}.fc2.bias": (exp,)}
            j += 1
        keys |= _conv_bn(f"features.{i}.block.{j}", (out, exp, 1, 1))
    keys |= _conv_bn("features.16", (960, 160, 1, 1))
    keys |= {"classifier.2.weight": (1280, 960), "classifier.2.bias": (1280,),
             "classifier.5.weight": (527, 1280), "classifier.5.bias": (527,)}
    return keys


def test_mn10_state_dict_layout():
    got = {k: tuple(v.shape) for k, v in meta_model(width=1.0).state_dict().items()}
    assert got == expected_mn10_layout()


def test_mn10_key_spot_checks():
    sd = meta_model(width=1.0).state_dict()
    assert sd["features.1.block.1.0.weight"].shape == (16, 16, 1, 1)  # no expand: dw at 0, project at 1
    assert sd["features.4.block.2.conc_se_layers.0.fc1.weight"].shape == (24, 72)
    assert sd["features.15.block.3.0.weight"].shape == (160, 960, 1, 1)
    assert sd["features.16.0.weight"].shape == (960, 160, 1, 1)
    assert sd["classifier.5.weight"].shape == (527, 1280)


def test_expand_conv_omitted_when_widths_match():
    sd = meta_model(width=0.1).state_dict()
    # At w = 0.1 blocks 1-4 all have in == exp == 8 (the notes name blocks 1 and 2; 3 and 4 follow
    # from the same rule): depthwise at j = 0, then block 4's SE at j = 1, project last.
    for i in (1, 2, 3):
        assert sd[f"features.{i}.block.0.0.weight"].shape[1] == 1
        assert sd[f"features.{i}.block.1.0.weight"].shape == (8, 8, 1, 1)
        assert not any(k.startswith(f"features.{i}.block.2.") for k in sd)
    assert sd["features.4.block.0.0.weight"].shape == (8, 1, 5, 5)
    assert sd["features.4.block.1.conc_se_layers.0.fc1.weight"].shape == (8, 8)
    assert sd["features.5.block.0.0.weight"].shape == (16, 8, 1, 1)  # exp 16 != in 8: expand present


def efficientat_head(head_type: str, width: float, classes: int = 527, heads: int = 4) -> dict[str, tuple]:
    """EfficientAT's classifier keys and shapes for one head type, from its table and module names."""
    embed, hidden = next((e, h) for _, w, _, e, h, _, _ in SIZE_TABLE if w == width)
    if head_type == "mlp":
        return {"classifier.2.weight": (hidden, embed), "classifier.2.bias": (hidden,),
                "classifier.5.weight": (classes, hidden), "classifier.5.bias": (classes,)}
    if head_type == "fully_convolutional":
        return _conv_bn("classifier", (classes, embed, 1, 1))
    return {"classifier.subspace_proj.weight": (2 * heads * classes, embed),
            "classifier.subspace_proj.bias": (2 * heads * classes,), "classifier.head_weight": (1, heads, 1)}


def head_reference(head_type: str, weights: dict[str, torch.Tensor], fmap: torch.Tensor) -> np.ndarray:
    """The head's eval-mode logits written out in float64 numpy, independently of the model code."""
    x = fmap.double().numpy()
    w = {k.removeprefix("classifier."): v.double().numpy() for k, v in weights.items() if k.startswith("classifier.")}
    if head_type == "mlp":
        hidden = x.mean(axis=(2, 3)) @ w["2.weight"].T + w["2.bias"]
        hidden = hidden * np.clip(hidden + 3, 0, 6) / 6  # hardswish
        return hidden @ w["5.weight"].T + w["5.bias"]
    if head_type == "fully_convolutional":
        conv = np.einsum("oc,bcft->boft", w["0.weight"][:, :, 0, 0], x)
        scale = w["1.weight"] / np.sqrt(w["1.running_var"] + 1e-5)  # nn.BatchNorm2d's default eps
        normed = (conv - w["1.running_mean"][:, None, None]) * scale[:, None, None] + w["1.bias"][:, None, None]
        return normed.mean(axis=(2, 3))
    frames = x.mean(axis=2).transpose(0, 2, 1)  # (B, T, C)
    projected = frames @ w["subspace_proj.weight"].T + w["subspace_proj.bias"]
    heads = w["head_weight"].shape[1]
    projected = projected.reshape(len(x), frames.shape[1], 2, heads, -1)
    att = np.clip(1 / (1 + np.exp(-projected[:, :, 0])), 1e-7, 1 - 1e-7)
    att = att / att.sum(axis=1, keepdims=True)
    return ((att * projected[:, :, 1]).sum(axis=1) * w["head_weight"]).sum(axis=1)


@pytest.mark.parametrize("width", [0.4, 1.0, 2.0])
@pytest.mark.parametrize("head_type", ["mlp", "fully_convolutional", "multihead_attention_pooling"])
def test_efficientat_heads_load_strictly_and_compute_its_logits(head_type, width):
    model = MobileNetV3(width=width, head_type=head_type, num_classes=40).eval()
    expected = efficientat_head(head_type, width, classes=40)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("classifier.")} == expected
    generator = torch.Generator().manual_seed(0)
    state = model.state_dict()
    for key, shape in expected.items():
        if key.endswith("num_batches_tracked"):
            continue
        values = torch.randn(shape, generator=generator) * 0.5
        # Small running variances, as trained fc heads have: they make the BatchNorm eps matter.
        state[key] = values.abs() * 1e-3 + 1e-4 if key.endswith("running_var") else values
        if key.endswith("subspace_proj.bias"):
            # Saturate the attention of every other (head, class): EfficientAT clamps it to [eps, 1 - eps].
            state[key][: len(values) // 2 : 2] -= 40
    model.load_state_dict(state, strict=True)
    fmap = torch.randn(3, model.embedding_dim, 4, 7, generator=generator)
    with torch.no_grad():
        ours = model.classifier(fmap).flatten(1).double().numpy()
    reference = head_reference(head_type, state, fmap)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


def test_only_the_body_takes_bn_momentum_and_eps():
    model = meta_model(width=1.0, head_type="fully_convolutional", bn_momentum=0.05)
    body = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    assert body and all(m.eps == 1e-3 and m.momentum == 0.05 for m in body)
    assert model.classifier[1].eps == 1e-5 and model.classifier[1].momentum == 0.1


def test_fully_convolutional_head_keys():
    sd = meta_model(width=1.0, head_type="fully_convolutional").state_dict()
    head = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("classifier.")}
    assert head == _conv_bn("classifier", (527, 960, 1, 1))


@pytest.mark.parametrize("head_type", ["mlp", "fully_convolutional", "multihead_attention_pooling"])
def test_strict_round_trip(tmp_path, head_type):
    torch.manual_seed(0)
    model = MobileNetV3(width=0.4, head_type=head_type)
    with torch.no_grad():
        model.train()(torch.randn(2, 1, 64, 64))  # move BN running stats off their defaults
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = MobileNetV3(width=0.4, head_type=head_type)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))


@pytest.mark.parametrize("head_type", ["mlp", "fully_convolutional", "multihead_attention_pooling"])
def test_head_types_forward(head_type):
    model = MobileNetV3(width=0.4, head_type=head_type)
    logits = model(torch.randn(3, 1, 64, 64))  # train mode: dropout and BN batch stats
    assert logits.shape == (3, 527)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_eval_forward_ten_seconds_with_embedding():
    model = MobileNetV3(width=1.0).eval()
    x = torch.randn(TEN_SECONDS)
    with torch.no_grad():
        logits, embedding = model(x, return_embedding=True)
        assert torch.equal(logits, model(x))
    assert logits.shape == (1, 527)
    assert embedding.shape == (1, model.embedding_dim) == (1, 960)
    assert torch.isfinite(logits).all()


def test_embedding_is_pooled_last_conv():
    model = MobileNetV3(width=0.4).eval()
    x = torch.randn(2, 1, 128, 64)
    with torch.no_grad():
        _, embedding = model(x, return_embedding=True)
        assert torch.allclose(embedding, model.features(x).mean(dim=(2, 3)))
    assert embedding.shape == (2, 384)


def test_any_frame_count_and_custom_strides():
    model = MobileNetV3(width=0.4, strides=(2, 2, 2, 1)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 128, 37)).shape == (1, 527)
        assert model.features(torch.randn(1, 1, 128, 1000)).shape[2:] == (8, 63)  # 16x total downsampling
    assert MobileNetV3(width=0.4).eval().features(torch.zeros(1, 1, 128, 1000)).shape[2:] == (4, 32)


def test_frequency_and_time_se():
    model = MobileNetV3(width=0.4, se_dims="cft", input_dim_t=200).eval()
    se = model.features[4].block[2].conc_se_layers
    # channels, then frequency and time after /8 (stem, blocks 2 and 4)
    assert [layer.fc1.in_features for layer in se] == [32, 16, 25]
    with torch.no_grad():
        assert model(torch.randn(2, 1, 128, 200)).shape == (2, 527)
    no_se = meta_model(width=0.4, se_dims="")
    assert not any("conc_se_layers" in k for k in no_se.state_dict())


def test_bn_dropout_and_frontend_settings():
    model = meta_model(width=1.0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 0.001 and m.momentum == 0.01 for m in bns)
    assert model.classifier[4].p == 0.2
    assert model.frontend_config == {"kind": "mel", "sample_rate": 32000, "n_mels": 128, "hop_length": 320}


@pytest.mark.parametrize("kwargs", [{"head_type": "transformer"}, {"strides": (2, 2, 2)}, {"se_dims": "cx"}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        MobileNetV3(**kwargs)


class _Attention(nn.Module):
    """Linear + explicit matmuls + fused attention, to check the functional-product counting."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        q = self.proj(x)
        scores = q @ q.transpose(-1, -2)
        out = torch.matmul(scores, q) + torch.bmm(scores, q)
        return out + nn.functional.scaled_dot_product_attention(q, q, q)


def test_count_macs_linear_and_attention_products():
    model = _Attention()
    linear = 2 * 5 * 8 * 8
    products = 3 * (2 * 5 * 5 * 8) + 2 * 5 * 5 * (8 + 8)
    assert count_macs(model, (2, 5, 8), count_matmul=False) == linear
    assert count_macs(model, (2, 5, 8)) == linear + products


def test_count_macs_multihead_attention_and_mode_restored():
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    rows = 2 * 10
    attention = 4 * rows * 64 * 64 + 2 * (2 * 10 * 10 * 64)
    assert count_macs(layer, (2, 10, 64)) == attention + 2 * rows * 64 * 128
    assert layer.training

