"""EfficientAT's MobileNetV3 ("mn") audio-tagging students, written from the reference notes.

The module tree mirrors EfficientAT's so that its released checkpoints (mn01_as ...
mn40_as, mn10_as_fc*) load with ``load_state_dict(strict=True)``: top-level
``features`` (stem, 15 inverted residuals, last 1x1 conv) and ``classifier``.
Facts follow EfficientAT (Schmid et al., ICASSP 2023) and its released code's module tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# EfficientAT's name -> width multiplier map (mn models only).
NAME_TO_WIDTH: dict[str, float] = {
    "mn01": 0.1,
    "mn02": 0.2,
    "mn04": 0.4,
    "mn05": 0.5,
    "mn06": 0.6,
    "mn08": 0.8,
    "mn10": 1.0,
    "mn12": 1.2,
    "mn14": 1.4,
    "mn16": 1.6,
    "mn20": 2.0,
    "mn30": 3.0,
    "mn40": 4.0,
}

HEAD_TYPES = ("mlp", "fully_convolutional", "multihead_attention_pooling")

BN_EPS = 0.001
BN_MOMENTUM = 0.01
SE_REDUCTION = 4
MLP_DROPOUT = 0.2  # fixed in EfficientAT: get_model does not expose it

# MobileNetV3-Large at width 1.0: (in, kernel, expanded, out, use_se, hardswish, stride slot).
# The stride slot indexes the `strides` argument; None means stride 1.
_LARGE_BLOCKS: tuple[tuple[int, int, int, int, bool, bool, int | None], ...] = (
    (16, 3, 16, 16, False, False, None),
    (16, 3, 64, 24, False, False, 0),
    (24, 3, 72, 24, False, False, None),
    (24, 5, 72, 40, True, False, 1),
    (40, 5, 120, 40, True, False, None),
    (40, 5, 120, 40, True, False, None),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, None),
    (80, 3, 184, 80, False, True, None),
    (80, 3, 184, 80, False, True, None),
    (80, 3, 480, 112, True, True, None),
    (112, 3, 672, 112, True, True, None),
    (112, 5, 672, 160, True, True, 3),
    (160, 5, 960, 160, True, True, None),
    (160, 5, 960, 160, True, True, None),
)
_LAST_CHANNEL = 1280


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round `v` to the nearest multiple of `divisor` (at least `min_value`), never dropping below 90 % of `v`.

    The TF-slim / torchvision rule EfficientAT uses for every channel count.
    """
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_out_size(size: int, kernel: int, stride: int) -> int:
    """Output length of a 'same'-padded conv ((k - 1) // 2 padding), used to size frequency/time SE."""
    padding = (kernel - 1) // 2
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class BlockConfig:
    """Channel widths and layout of one inverted residual after width scaling."""

    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    use_hardswish: bool
    stride: int


def block_configs(width: float = 1.0, strides: tuple[int, int, int, int] = (2, 2, 2, 2)) -> list[BlockConfig]:
    """The 15 MobileNetV3-Large blocks scaled by `width`; in/exp/out each go through make_divisible."""
    return [
        BlockConfig(
            in_channels=make_divisible(c_in * width),
            kernel=k,
            expanded=make_divisible(exp * width),
            out_channels=make_divisible(c_out * width),
            use_se=se,
            use_hardswish=hs,
            stride=1 if slot is None else strides[slot],
        )
        for c_in, k, exp, c_out, se, hs, slot in _LARGE_BLOCKS
    ]


def _conv_bn_act(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, activation: type[nn.Module] | None = None
) -> nn.Sequential:
    """conv (no bias) -> BN -> optional activation; indices .0/.1/.2 match EfficientAT's keys."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM),
    ]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Rescale one axis (channel, frequency or time) by a gate computed from the mean over the other two.

    EfficientAT's variant: Linear layers and a Sigmoid gate (torchvision uses 1x1
    convs and Hardsigmoid).
    """

    _AXIS = {"c": 1, "f": 2, "t": 3}

    def __init__(self, dim: str, size: int, squeeze: int):
        super().__init__()
        self.axis = self._AXIS[dim]
        self.fc1 = nn.Linear(size, squeeze)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(squeeze, size)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = tuple(a for a in (1, 2, 3) if a != self.axis)
        scale = self.gate(self.fc2(self.relu(self.fc1(x.mean(dim=other)))))
        shape = [x.shape[0], 1, 1, 1]
        shape[self.axis] = -1
        return x * scale.view(shape)


class ConcurrentSE(nn.Module):
    """One SqueezeExcitation per requested axis, outputs combined elementwise by `agg`."""

    def __init__(self, layers: list[SqueezeExcitation], agg: str):
        super().__init__()
        if agg not in ("max", "avg", "add"):
            raise ValueError(f"se_agg must be 'max', 'avg' or 'add', got {agg!r}")
        self.conc_se_layers = nn.ModuleList(layers)
        self.agg = agg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.conc_se_layers) == 1:
            return self.conc_se_layers[0](x)
        outs = torch.stack([se(x) for se in self.conc_se_layers])
        if self.agg == "max":
            return outs.amax(dim=0)
        if self.agg == "avg":
            return outs.mean(dim=0)
        return outs.sum(dim=0)


class InvertedResidual(nn.Module):
    """Expand 1x1 (omitted when expanded == in) -> depthwise -> optional SE -> project 1x1.

    The residual is added iff stride is 1 and in == out. Omitting the expand conv
    shifts the `block.<j>` indices, exactly as in EfficientAT's checkpoints.
    """

    def __init__(self, cfg: BlockConfig, se: ConcurrentSE | None):
        super().__init__()
        act = nn.Hardswish if cfg.use_hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if cfg.expanded != cfg.in_channels:
            layers.append(_conv_bn_act(cfg.in_channels, cfg.expanded, 1, activation=act))
        layers.append(_conv_bn_act(cfg.expanded, cfg.expanded, cfg.kernel, cfg.stride, cfg.expanded, act))
        if se is not None:
            layers.append(se)
        layers.append(_conv_bn_act(cfg.expanded, cfg.out_channels, 1))
        self.block = nn.Sequential(*layers)
        self.use_residual = cfg.stride == 1 and cfg.in_channels == cfg.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class MultiHeadAttentionPooling(nn.Module):
    """PSLA-style attention pooling over time (EfficientAT's third head type; no released checkpoint).

    Frequency is averaged out, then one Linear per frame (`subspace_proj`) gives, for each of
    `num_heads` heads, attention logits and values per class. The sigmoid attention is clamped
    to [eps, 1 - eps] and normalised over time, values stay linear (identity), and the per-head
    pooled logits are mixed by a learned `head_weight` of shape (1, heads, 1). Names, shapes and
    arithmetic are EfficientAT's, so its weights load strictly and give its logits.
    """

    def __init__(self, in_dim: int, num_classes: int, num_heads: int = 4, eps: float = 1e-7):
        super().__init__()
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.eps = eps
        self.subspace_proj = nn.Linear(in_dim, 2 * num_heads * num_classes)
        self.head_weight = nn.Parameter(torch.full((1, num_heads, 1), 1.0 / num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.mean(dim=2).transpose(1, 2)  # (B, T, C)
        projected = self.subspace_proj(frames).view(x.shape[0], -1, 2, self.num_heads, self.num_classes)
        att, val = projected.unbind(dim=2)  # each (B, T, heads, classes)
        att = torch.sigmoid(att).clamp(self.eps, 1.0 - self.eps)
        att = att / att.sum(dim=1, keepdim=True)
        pooled = (att * val).sum(dim=1)  # (B, heads, classes)
        return (pooled * self.head_weight).sum(dim=1)


class MobileNetV3(nn.Module):
    """EfficientAT's `MN`: single-channel MobileNetV3-Large on log-mel input (B, 1, n_mels, frames).

    `forward(x)` returns logits (B, num_classes); `forward(x, return_embedding=True)`
    returns (logits, embedding), the embedding being the global average of the last
    conv's output (`embedding_dim` = 6 x last block width, 960 for mn10).

    `se_dims` picks the SE axes ("c", "f", "t" or a combination; "" disables SE);
    the defaults match all released *_as checkpoints except possibly mn01/mn02.
    `input_dim_f`/`input_dim_t` only size frequency/time SE layers (and set
    `frontend_config["n_mels"]`); time SE ties the model to that frame count.
    """

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 527,
        head_type: str = "mlp",
        se_dims: str = "c",
        se_agg: str = "max",
        strides: tuple[int, int, int, int] = (2, 2, 2, 2),
        in_channels: int = 1,
        in_conv_kernel: int = 3,
        in_conv_stride: int = 2,
        input_dim_f: int = 128,
        input_dim_t: int = 1000,
        attention_heads: int = 4,
        bn_momentum: float = BN_MOMENTUM,
    ):
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
        if len(strides) != 4:
            raise ValueError(f"strides must have 4 entries (blocks 2, 4, 7, 13), got {strides!r}")
        if set(se_dims) - set("cft") or len(set(se_dims)) != len(se_dims):
            raise ValueError(f"se_dims must be distinct letters from 'cft', got {se_dims!r}")
        self.width = width
        self.num_classes = num_classes
        self.head_type = head_type
        self.frontend_config = {"kind": "mel", "sample_rate": 32000, "n_mels": input_dim_f, "hop_length": 320}

        configs = block_configs(width, tuple(strides))
        stem_out = configs[0].in_channels
        f = conv_out_size(input_dim_f, in_conv_kernel, in_conv_stride)
        t = conv_out_size(input_dim_t, in_conv_kernel, in_conv_stride)
        stem = _conv_bn_act(in_channels, stem_out, in_conv_kernel, in_conv_stride, activation=nn.Hardswish)
        layers: list[nn.Module] = [stem]
        for cfg in configs:
            # SE runs after the depthwise conv, so it sees that conv's output resolution.
            f = conv_out_size(f, cfg.kernel, cfg.stride)
            t = conv_out_size(t, cfg.kernel, cfg.stride)
            se = None
            if cfg.use_se and se_dims:
                sizes = {"c": cfg.expanded, "f": f, "t": t}
                squeeze = {d: make_divisible(sizes[d] // SE_REDUCTION) for d in se_dims}
                se = ConcurrentSE([SqueezeExcitation(d, sizes[d], squeeze[d]) for d in se_dims], se_agg)
            layers.append(InvertedResidual(cfg, se))
        last_block_out = configs[-1].out_channels
        self.embedding_dim = 6 * last_block_out
        layers.append(_conv_bn_act(last_block_out, self.embedding_dim, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)

        if head_type == "mlp":
            hidden = make_divisible(_LAST_CHANNEL * width)
            self.classifier: nn.Module = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(1),
                nn.Linear(self.embedding_dim, hidden),
                nn.Hardswish(),
                nn.Dropout(p=MLP_DROPOUT),
                nn.Linear(hidden, num_classes),
            )
        elif head_type == "fully_convolutional":
            self.classifier = nn.Sequential(
                nn.Conv2d(self.embedding_dim, num_classes, 1, bias=False),
                # EfficientAT's head uses PyTorch's default BatchNorm (eps 1e-5, momentum 0.1), not the body's.
                nn.BatchNorm2d(num_classes),
                nn.AdaptiveAvgPool2d(1),
            )
        else:
            self.classifier = MultiHeadAttentionPooling(self.embedding_dim, num_classes, attention_heads)
        self._init_weights()
        # EfficientAT's 0.01 suits 200 epochs of 100 k clips; short runs need faster running statistics.
        # Body only: the fc head's BatchNorm keeps EfficientAT's momentum 0.1.
        for module in self.features.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum

    def _init_weights(self) -> None:
        """EfficientAT's init: kaiming fan-out convs, unit/zero BN, N(0, 0.01) linears, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, return_embedding: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, num_classes), plus the pooled last-conv embedding (B, embedding_dim) if asked."""
        fmap = self.features(x)
        logits = self.classifier(fmap).flatten(1)
        if return_embedding:
            return logits, fmap.mean(dim=(2, 3))
        return logits
