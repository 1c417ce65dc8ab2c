"""EfficientAT dynamic MobileNets (DyMN): published sizes, checkpoint key layout, one block against numpy, training.

Expected numbers come from EfficientAT's README table (dymn04/10/20_as: 1.97 / 10.57 / 40.02 M) and the
module tree of its models/dymn/{model,dy_block}.py, written out here independently of pipeline/models/dymn.py.
Size and layout checks build models on the meta device, so even dymn20 costs no compute.
"""

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.models import create_model
from kdpipe.models.complexity import count_macs
from kdpipe.models.dymn import DYMN_NAME_TO_WIDTH, DyBlock, DyMN, DynamicConv
from kdpipe.models.mobilenet import BlockConfig, MobileNetV3, make_divisible
from kdpipe.training import at_kept_epoch

# MobileNetV3-Large at w = 1.0: (in, kernel, expanded, out) per block, the same table as the mn family.
LARGE_BLOCKS = [
    (16, 3, 16, 16), (16, 3, 64, 24), (24, 3, 72, 24), (24, 5, 72, 40), (40, 5, 120, 40), (40, 5, 120, 40),
    (40, 3, 240, 80), (80, 3, 200, 80), (80, 3, 184, 80), (80, 3, 184, 80), (80, 3, 480, 112),
    (112, 3, 672, 112), (112, 5, 672, 160), (160, 5, 960, 160), (160, 5, 960, 160),
]
K, M = 4, 2  # kernels per dynamic conv, linear maps per DyReLU channel
# (width, README params in M). The README's figures equal parameters plus BatchNorm running mean/var;
# parameters alone are 1.961 / 10.548 / 39.966 M.
SIZE_TABLE = [(0.4, 1.97, "0.12"), (1.0, 10.57, "0.58"), (2.0, 40.02, "2.2")]  # M parameters, GMACs at 10 s
PARAMS_ONLY = {0.4: 1_961_239, 1.0: 10_548_479, 2.0: 39_966_143}
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "lambdas", "init_v")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second OpenMP thread costs more than it saves, and on a busy 2-core machine much more."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def meta_model(**kwargs) -> DyMN:
    with torch.device("meta"):
        return DyMN(**kwargs)


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    stats = {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")}
    return {**stats, f"{prefix}.num_batches_tracked": ()}


def _dyconv(prefix: str, kernel_numel: int, h: int) -> dict[str, tuple[int, ...]]:
    """DynamicConv: K kernels flattened into one (1, att_groups=1, K, out*in/groups*k*k) tensor, then the attention Linear."""
    return {f"{prefix}.weight": (1, 1, K, kernel_numel), f"{prefix}.residuals.0.weight": (K, h),
            f"{prefix}.residuals.0.bias": (K,)}


def expected_layout(width: float, num_classes: int = 527) -> dict[str, tuple[int, ...]]:
    """EfficientAT's DyMN state dict (keys in order, shapes) for use_dy_blocks='all' and the mlp head.

    Order follows its registration order: `layers` is created before `in_c`; inside a DY_Block
    exp_conv, exp_norm, depth_conv, depth_norm, depth_act, proj_conv, proj_norm, context_gen.
    """
    def md(c: float) -> int:
        return make_divisible(c * width, 8)

    keys: dict[str, tuple[int, ...]] = {}
    for i, (c_in, k, exp, out) in enumerate(LARGE_BLOCKS):
        c_in, exp, out = md(c_in), md(exp), md(out)
        h = min(max(make_divisible(exp // 4, 8), md(32)), md(128))  # context size H
        p = f"layers.{i}"
        if exp != c_in:
            keys |= _dyconv(f"{p}.exp_conv", exp * c_in, h) | _bn(f"{p}.exp_norm", exp)
        keys |= _dyconv(f"{p}.depth_conv", exp * k * k, h) | _bn(f"{p}.depth_norm", exp)
        keys |= {f"{p}.depth_act.lambdas": (2 * M,), f"{p}.depth_act.init_v": (2 * M,),
                 f"{p}.depth_act.coef_net.0.weight": (2 * M * exp, h), f"{p}.depth_act.coef_net.0.bias": (2 * M * exp,)}
        keys |= _dyconv(f"{p}.proj_conv", out * exp, h) | _bn(f"{p}.proj_norm", out)
        g = f"{p}.context_gen"
        keys |= {f"{g}.joint_conv.weight": (h, c_in, 1, 1)} | _bn(f"{g}.joint_norm", h)
        keys |= {f"{g}.conv_f.weight": (exp, h, 1, 1), f"{g}.conv_f.bias": (exp,),
                 f"{g}.conv_t.weight": (exp, h, 1, 1), f"{g}.conv_t.bias": (exp,)}
    stem, last = md(16), md(160)
    keys |= {"in_c.0.weight": (stem, 1, 3, 3)} | _bn("in_c.1", stem)
    keys |= {"out_c.0.weight": (6 * last, last, 1, 1)} | _bn("out_c.1", 6 * last)
    hidden = md(1280)
    keys |= {"classifier.2.weight": (hidden, 6 * last), "classifier.2.bias": (hidden,),
             "classifier.5.weight": (num_classes, hidden), "classifier.5.bias": (num_classes,)}
    return keys


def test_name_to_width_and_frontend():
    assert DYMN_NAME_TO_WIDTH == {"dymn04": 0.4, "dymn10": 1.0, "dymn20": 2.0}
    with torch.device("meta"):
        assert DyMN(input_dim_f=64).frontend_config == MobileNetV3(input_dim_f=64).frontend_config == {
            "kind": "mel", "sample_rate": 32000, "n_mels": 64, "hop_length": 320}


@pytest.mark.parametrize(("width", "params_m", "gmacs"), SIZE_TABLE)
def test_published_sizes_and_state_dict_layout(width, params_m, gmacs):
    model = meta_model(width=width)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = expected_layout(width)
    assert got == list(expected.items())
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(int(np.prod(s)) for k, s in expected.items() if not k.endswith(BUFFER_SUFFIXES))
    assert params == PARAMS_ONLY[width]
    running = sum(int(np.prod(s)) for k, s in expected.items() if k.endswith(("running_mean", "running_var")))
    assert round((params + running) / 1e6, 2) == params_m
    assert model.embedding_dim == 6 * make_divisible(160 * width, 8)
    assert f"{count_macs(model, (1, 1, 128, 1000)) / 1e9:.2g}" == gmacs


def test_temperature_of_loaded_weights(tmp_path):
    """Fresh: the schedule's start. Loaded weights: its end (EfficientAT's pretrain_final_temp for _as weights),
    or, for a kdpipe training's output, the temperature of the epoch it kept."""
    assert create_model("dymn_tiny", num_classes=3).temperature == 30.0
    torch.save(create_model("dymn_tiny", num_classes=3).state_dict(), tmp_path / "model.pt")
    loaded = create_model("dymn_tiny", checkpoint=tmp_path / "model.pt")
    assert loaded.temperature == 1.0
    (tmp_path / "kept.json").write_text(json.dumps({"epoch": 5}))
    assert at_kept_epoch(loaded, tmp_path).temperature == 26.0  # the 5th epoch ran at 30 - 4


def test_dymn10_key_spot_checks():
    sd = meta_model(width=1.0).state_dict()
    assert len(sd) == 578
    assert not any(k.startswith("layers.0.exp_") for k in sd)  # block 1: expanded == in, no expand conv
    assert sd["layers.0.depth_conv.weight"].shape == (1, 1, 4, 16 * 3 * 3)
    assert sd["layers.1.exp_conv.weight"].shape == (1, 1, 4, 64 * 16)
    assert sd["layers.1.exp_conv.residuals.0.weight"].shape == (4, 32)  # H = max(16, 32)
    assert sd["layers.6.context_gen.conv_f.weight"].shape == (240, 64, 1, 1)  # H = 240 / 4
    assert sd["layers.14.depth_act.coef_net.0.weight"].shape == (2 * 2 * 960, 128)  # H = min(240, 128)
    assert sd["layers.12.depth_conv.weight"].shape == (1, 1, 4, 672 * 5 * 5)
    assert sd["in_c.0.weight"].shape == (16, 1, 3, 3)
    assert sd["out_c.0.weight"].shape == (960, 160, 1, 1)
    assert sd["classifier.5.weight"].shape == (527, 1280)


def test_replace_se_keeps_static_blocks_outside_se_positions():
    sd = meta_model(width=1.0, use_dy_blocks="replace_se").state_dict()
    dynamic = {int(k.split(".")[1]) for k in sd if ".context_gen." in k}
    assert dynamic == {3, 4, 5, 10, 11, 12, 13, 14}
    assert sd["layers.0.block.0.0.weight"].shape == (16, 1, 3, 3)  # mn layout, no SE
    assert sd["layers.1.block.2.0.weight"].shape == (24, 64, 1, 1)
    assert not any("conc_se_layers" in k for k in sd)


# ---- one dynamic block against numpy (float64, eval-mode BatchNorm) ----

def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))


def _hardswish(v: np.ndarray) -> np.ndarray:
    return v * np.clip(v + 3, 0, 6) / 6


def _batch_norm(w: dict, prefix: str, v: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    shape = (1, -1) + (1,) * (v.ndim - 2)
    scale = w[f"{prefix}.weight"] / np.sqrt(w[f"{prefix}.running_var"] + eps)
    return (v - w[f"{prefix}.running_mean"].reshape(shape)) * scale.reshape(shape) + w[f"{prefix}.bias"].reshape(shape)


def _conv2d(x: np.ndarray, kernel: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """One sample: x (C, F, T), kernel (O, C / groups, k, k), zero padding (k - 1) // 2."""
    k = kernel.shape[-1]
    pad = (k - 1) // 2
    c, f, t = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    fo, to = (f + 2 * pad - k) // stride + 1, (t + 2 * pad - k) // stride + 1
    xg = xp.reshape(groups, c // groups, *xp.shape[1:])
    kg = kernel.reshape(groups, -1, c // groups, k, k)
    out = np.zeros((groups, kg.shape[1], fo, to))
    for i in range(k):
        for j in range(k):
            patch = xg[:, :, i : i + stride * (fo - 1) + 1 : stride, j : j + stride * (to - 1) + 1 : stride]
            out += np.einsum("goc,gcft->goft", kg[:, :, :, i, j], patch)
    return out.reshape(-1, fo, to)


def _avg_pool3(seq: np.ndarray, stride: int) -> np.ndarray:
    """Average pooling over the last axis, kernel 3, padding 1 counted as zeros."""
    n = (seq.shape[-1] - 1) // stride + 1
    padded = np.pad(seq, [(0, 0)] * (seq.ndim - 1) + [(1, 1)])
    return sum(padded[..., i : i + stride * (n - 1) + 1 : stride] for i in range(3)) / 3


def _dynamic_conv(w, prefix, x, context, temperature, out_ch, kernel, stride=1, groups=1):
    """Eq. 6: attention = softmax(Linear(context) / T) over K kernels; each sample convolves with its own mix."""
    logits = (context @ w[f"{prefix}.residuals.0.weight"].T + w[f"{prefix}.residuals.0.bias"]) / temperature
    attention = np.exp(logits - logits.max(axis=1, keepdims=True))
    attention /= attention.sum(axis=1, keepdims=True)
    kernels = w[f"{prefix}.weight"].reshape(K, out_ch, -1, kernel, kernel)
    return np.stack([_conv2d(xb, np.tensordot(ab, kernels, axes=1), stride, groups) for xb, ab in zip(x, attention)])


def _dyrelu_b(w, prefix, x, context):
    """Eq. 4: y_c = max_m(a_cm x_c + b_cm); a = 1 + theta (first map) or theta, b = 0.5 theta, theta in [-1, 1]."""
    theta = 2 * _sigmoid(context @ w[f"{prefix}.coef_net.0.weight"].T + w[f"{prefix}.coef_net.0.bias"]) - 1
    theta = theta.reshape(len(x), x.shape[1], 2 * M)  # per channel: M slopes, then M intercepts
    slopes = theta[:, :, :M] + np.array([1.0] + [0.0] * (M - 1))
    intercepts = 0.5 * theta[:, :, M:]
    maps = [x * slopes[:, :, m, None, None] + intercepts[:, :, m, None, None] for m in range(M)]
    return np.maximum.reduce(maps)


def block_reference(w: dict, x: np.ndarray, cfg: BlockConfig, temperature: float) -> np.ndarray:
    """A DyMN block from the paper's equations and EfficientAT's layer order, in float64 numpy."""
    f = x.shape[2]
    # Context: frequency and time profiles through a shared 1x1 conv + BN + Hardswish.
    profiles = np.concatenate([x.mean(axis=3), x.mean(axis=2)], axis=2)  # (B, C_in, F + T)
    h = np.einsum("hc,bcl->bhl", w["context_gen.joint_conv.weight"][:, :, 0, 0], profiles)
    h = _hardswish(_batch_norm(w, "context_gen.joint_norm", h))
    context = h.mean(axis=2)  # (B, H)
    h_f, h_t = h[:, :, :f], h[:, :, f:]
    if cfg.stride > 1:
        h_f, h_t = _avg_pool3(h_f, cfg.stride), _avg_pool3(h_t, cfg.stride)
    att_f = np.einsum("eh,bhl->bel", w["context_gen.conv_f.weight"][:, :, 0, 0], h_f) + w["context_gen.conv_f.bias"][:, None]
    att_t = np.einsum("eh,bhl->bel", w["context_gen.conv_t.weight"][:, :, 0, 0], h_t) + w["context_gen.conv_t.bias"][:, None]

    out = x
    if cfg.expanded != cfg.in_channels:
        out = _batch_norm(w, "exp_norm", _dynamic_conv(w, "exp_conv", out, context, temperature, cfg.expanded, 1))
        out = _hardswish(out) if cfg.use_hardswish else np.maximum(out, 0)
    out = _dynamic_conv(w, "depth_conv", out, context, temperature, cfg.expanded, cfg.kernel, cfg.stride, cfg.expanded)
    out = _dyrelu_b(w, "depth_act", _batch_norm(w, "depth_norm", out), context)
    out = out * _sigmoid(att_f)[:, :, :, None] * _sigmoid(att_t)[:, :, None, :]  # coordinate attention
    out = _batch_norm(w, "proj_norm", _dynamic_conv(w, "proj_conv", out, context, temperature, cfg.out_channels, 1))
    if cfg.stride == 1 and cfg.in_channels == cfg.out_channels:
        out = out + x
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        BlockConfig(8, 3, 24, 16, use_se=False, use_hardswish=True, stride=2),  # expand, stride 2, pooled CA
        BlockConfig(16, 5, 40, 16, use_se=True, use_hardswish=False, stride=1),  # expand + residual
        BlockConfig(16, 3, 16, 16, use_se=False, use_hardswish=False, stride=1),  # no expand conv
    ],
)
def test_block_matches_numpy_reference(cfg):
    generator = torch.Generator().manual_seed(0)
    block = DyBlock(cfg, width=1.0).double().eval()
    with torch.no_grad():
        for name, tensor in block.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=torch.float64) + 0.5)
            elif not name.endswith(("num_batches_tracked", "lambdas", "init_v")):
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
    for module in block.modules():
        if isinstance(module, DynamicConv):
            module.temperature = 0.7
    x = torch.randn(2, cfg.in_channels, 10, 9, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        got = block(x).numpy()
    weights = {k: v.numpy() for k, v in block.state_dict().items()}
    expected = block_reference(weights, x.numpy(), cfg, temperature=0.7)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-10 * np.abs(expected).max()


# ---- temperature schedule, training, loading ----

@pytest.mark.parametrize(("epoch", "expected"), [(0, 30.0), (10, 20.0), (28, 2.0), (29, 1.0), (60, 1.0)])
def test_temperature_schedule(epoch, expected):
    model = DyMN(width=0.1, num_classes=5)
    assert model.temperature == 30.0
    keys = list(model.state_dict())
    assert model.update_params(epoch) == pytest.approx(expected)
    temperatures = {m.temperature for m in model.modules() if isinstance(m, DynamicConv)}
    assert len(temperatures) == 1 and temperatures.pop() == pytest.approx(expected)
    assert list(model.state_dict()) == keys  # the temperature is not checkpointed


def test_temperature_schedule_shallow_line_and_pretrained_start():
    # Below T = 1 the shallow line (slope t1_slope) takes over once t_min allows it.
    assert DyMN(width=0.1, t_min=0.5).update_params(40) == pytest.approx(1 + 0.02 * 29 - 0.02 * 40)
    as_model = DyMN(width=0.1, t_max=1.0)  # EfficientAT's pretrain_final_temp for AudioSet weights
    assert as_model.temperature == 1.0 and as_model.update_params(5) == 1.0
    as_model.set_temperature(3.0)
    assert as_model.temperature == 3.0


def test_trains_one_step_and_returns_embedding():
    torch.manual_seed(0)
    model = DyMN(width=0.1, num_classes=5).train()
    x = torch.randn(4, 1, 64, 48)
    y = (torch.rand(4, 5) > 0.5).float()

    def loss_fn() -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout mask each time
        return F.binary_cross_entropy_with_logits(model(x), y)

    loss = loss_fn()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    with torch.no_grad():
        assert loss_fn() < loss

    model.eval()
    pooled = []
    model.out_c.register_forward_hook(lambda mod, inp, out: pooled.append(out.mean(dim=(2, 3))))
    with torch.no_grad():
        logits, embedding = model(x, return_embedding=True)
        assert torch.equal(model(x), logits)
    assert logits.shape == (4, 5)
    assert embedding.shape == (4, model.embedding_dim) == (4, 96)
    assert torch.equal(embedding, pooled[0])


def test_strict_round_trip_and_width_mismatch():
    source = DyMN(width=0.1, num_classes=5).eval()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    target = DyMN(width=0.1, num_classes=5).eval()
    target.load_state_dict(state, strict=True)
    x = torch.randn(2, 1, 32, 40)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        DyMN(width=0.2, num_classes=5).load_state_dict(state, strict=True)


@pytest.mark.parametrize(
    "kwargs", [{"head_type": "multihead_attention_pooling"}, {"use_dy_blocks": "none"}, {"strides": (2, 2, 2)}]
)
def test_rejects_unknown_options(kwargs):
    with pytest.raises(ValueError):
        meta_model(**kwargs)
