"""EfficientAT's dynamic MobileNets ("dymn") audio-tagging students, written from its paper and released code.

DyMN (Schmid et al., TASLP, arXiv 2310.15648) keeps the mn family's 15-block MobileNetV3-Large
table and width rule, but every inverted residual becomes a dynamic block: 1x1 expand, depthwise
and 1x1 project are dynamic convolutions (a per-clip softmax mix of K = 4 kernels), the depthwise
activation is a DyReLU-B (per-channel max of M = 2 linear maps), and coordinate attention follows
it. One context generator per block feeds all three. The module tree mirrors EfficientAT's
(`in_c`, `layers.<i>.*`, `out_c`, `classifier`), so its released dymn04/10/20 `_as` and `_im`
checkpoints load with ``load_state_dict(strict=True)``. Facts follow EfficientAT's
models/dymn/{model,dy_block,utils}.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.models.mobilenet import (
    _LAST_CHANNEL,
    BN_EPS,
    BN_MOMENTUM,
    MLP_DROPOUT,
    BlockConfig,
    InvertedResidual,
    _conv_bn_act,
    block_configs,
    make_divisible,
)

# EfficientAT's name -> width multiplier map (dymn models).
DYMN_NAME_TO_WIDTH: dict[str, float] = {"dymn04": 0.4, "dymn10": 1.0, "dymn20": 2.0}

HEAD_TYPES = ("mlp", "fully_convolutional")
DY_BLOCK_PLACEMENTS = ("all", "replace_se")

DYCONV_K = 4  # kernels mixed by each dynamic convolution
DYRELU_M = 2  # linear maps per channel in DyReLU-B
CONTEXT_RATIO = 4
MIN_CONTEXT = 32  # context size bounds at width 1.0, scaled by width
MAX_CONTEXT = 128


def context_size(expanded: int, width: float) -> int:
    """H, the per-block context vector size: expanded / 4 clipped to [32 w, 128 w], all rounded to 8."""
    low, high = make_divisible(MIN_CONTEXT * width), make_divisible(MAX_CONTEXT * width)
    return min(max(make_divisible(expanded // CONTEXT_RATIO), low), high)


def temperature_at(epoch: float, t_max: float, t_min: float, t0_slope: float, t1_slope: float) -> float:
    """EfficientAT's kernel-attention temperature (paper eq. 5) after `epoch` epochs.

    A steep line from t_max down to 1 (reached at epoch (t_max - 1) / t0_slope), a shallow one
    (t1_slope) continuing below it, floored at t_min. With t_min >= 1 the shallow line never binds.
    """
    steep = t_max - t0_slope * epoch
    shallow = 1 + t1_slope * (t_max - 1) / t0_slope - t1_slope * epoch
    return max(steep, shallow, t_min)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class DynamicConv(nn.Module):
    """Conv whose kernel is a per-sample convex mix of K kernels, weighted by softmax(Linear(context) / T).

    `weight` keeps EfficientAT's flat (1, 1, K, out * in/groups * k * k) layout; the mixed kernels
    run as one grouped conv with the batch folded into the channel axis.
    """

    def __init__(self, c_in: int, c_out: int, context: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c_in, self.c_out, self.kernel, self.stride, self.groups = c_in, c_out, kernel, stride, groups
        self.temperature = 1.0  # DyMN sets it from its schedule
        weight = torch.empty(DYCONV_K, c_out, c_in // groups, kernel, kernel)
        for w in weight:  # EfficientAT initialises each kernel on its own; DyMN's init loop skips this module
            nn.init.kaiming_normal_(w, mode="fan_out")
        self.weight = nn.Parameter(weight.reshape(1, 1, DYCONV_K, -1))
        self.residuals = nn.Sequential(nn.Linear(context, DYCONV_K))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, f, t = x.shape
        attention = torch.softmax(self.residuals(context) / self.temperature, dim=-1)  # (B, K)
        kernels = (attention @ self.weight[0, 0]).reshape(b * self.c_out, self.c_in // self.groups,
                                                          self.kernel, self.kernel)
        out = F.conv2d(x.reshape(1, b * self.c_in, f, t), kernels, stride=self.stride,
                       padding=(self.kernel - 1) // 2, groups=self.groups * b)
        return out.view(b, self.c_out, out.shape[-2], out.shape[-1])


class DyReLUB(nn.Module):
    """DyReLU-B: y = max_m(a_m x + b_m) with per-sample, per-channel (a_m, b_m) predicted from the context.

    coefs = 2 sigmoid(Linear(context)) - 1 are scaled by `lambdas` (1 for slopes, 0.5 for
    intercepts) and offset by `init_v` (a_1 = 1 + ..., rest 0 + ...), so it starts near ReLU.
    Both are persistent buffers, as in EfficientAT's checkpoints.
    """

    def __init__(self, channels: int, context: int, m: int = DYRELU_M):
        super().__init__()
        self.channels, self.m = channels, m
        self.register_buffer("lambdas", torch.tensor([1.0] * m + [0.5] * m))
        self.register_buffer("init_v", torch.tensor([1.0] + [0.0] * (2 * m - 1)))
        self.coef_net = nn.Sequential(nn.Linear(context, 2 * m * channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        theta = 2 * torch.sigmoid(self.coef_net(context)) - 1
        coefs = theta.view(-1, self.channels, 1, 1, 2 * self.m) * self.lambdas + self.init_v
        return (x.unsqueeze(-1) * coefs[..., : self.m] + coefs[..., self.m :]).amax(dim=-1)


class ContextGen(nn.Module):
    """A block's shared context: from its input's frequency and time profiles (means over the other axis).

    Both profiles go through one 1x1 conv + BN + Hardswish (H channels). Their mean over all F + T
    positions is the context vector (B, H) for the dynamic convs and DyReLU; per-position 1x1 convs
    (`conv_f`, `conv_t`, pooled to the depthwise stride) give the coordinate-attention logits.
    """

    def __init__(self, context: int, c_in: int, expanded: int, stride: int):
        super().__init__()
        self.stride = stride
        self.joint_conv = nn.Conv2d(c_in, context, 1, bias=False)
        self.joint_norm = _batch_norm(context)
        self.conv_f = nn.Conv2d(context, expanded, 1)
        self.conv_t = nn.Conv2d(context, expanded, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context (B, H), frequency logits (B, exp, F', 1), time logits (B, exp, 1, T'))."""
        f = x.shape[2]
        profiles = torch.cat([x.mean(dim=3, keepdim=True), x.mean(dim=2, keepdim=True).transpose(2, 3)], dim=2)
        h = F.hardswish(self.joint_norm(self.joint_conv(profiles)))  # (B, H, F + T, 1)
        h_f, h_t = h[:, :, :f], h[:, :, f:].transpose(2, 3)
        if self.stride > 1:  # count_include_pad average pooling, like EfficientAT's nn.AvgPool2d
            h_f = F.avg_pool2d(h_f, (3, 1), (self.stride, 1), (1, 0))
            h_t = F.avg_pool2d(h_t, (1, 3), (1, self.stride), (0, 1))
        return h.mean(dim=(2, 3)), self.conv_f(h_f), self.conv_t(h_t)


class DyBlock(nn.Module):
    """EfficientAT's DY_Block: dynamic expand -> BN -> act, dynamic depthwise -> BN -> DyReLU-B ->
    coordinate attention, dynamic project -> BN, plus the residual iff stride 1 and in == out.

    Without expansion (expanded == in) the expand conv, its BN and activation are absent.
    """

    def __init__(self, cfg: BlockConfig, width: float):
        super().__init__()
        context = context_size(cfg.expanded, width)
        self.use_residual = cfg.stride == 1 and cfg.in_channels == cfg.out_channels
        self.exp_conv = self.exp_norm = self.exp_act = None
        if cfg.expanded != cfg.in_channels:
            self.exp_conv = DynamicConv(cfg.in_channels, cfg.expanded, context, 1)
            self.exp_norm = _batch_norm(cfg.expanded)
            self.exp_act = nn.Hardswish() if cfg.use_hardswish else nn.ReLU()
        self.depth_conv = DynamicConv(cfg.expanded, cfg.expanded, context, cfg.kernel, cfg.stride, cfg.expanded)
        self.depth_norm = _batch_norm(cfg.expanded)
        self.depth_act = DyReLUB(cfg.expanded, context)
        self.proj_conv = DynamicConv(cfg.expanded, cfg.out_channels, context, 1)
        self.proj_norm = _batch_norm(cfg.out_channels)
        self.context_gen = ContextGen(context, cfg.in_channels, cfg.expanded, cfg.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context, logits_f, logits_t = self.context_gen(x)
        out = x
        if self.exp_conv is not None:
            out = self.exp_act(self.exp_norm(self.exp_conv(out, context)))
        out = self.depth_act(self.depth_norm(self.depth_conv(out, context)), context)
        out = out * torch.sigmoid(logits_f) * torch.sigmoid(logits_t)  # coordinate attention
        out = self.proj_norm(self.proj_conv(out, context))
        return out + x if self.use_residual else out


class DyMN(nn.Module):
    """EfficientAT's `DyMN` on log-mel input (B, 1, n_mels, frames).

    `forward(x)` returns logits (B, num_classes); `forward(x, return_embedding=True)` returns
    (logits, embedding), the embedding being what EfficientAT returns next to its logits: the
    global average of the last 1x1 conv's (`out_c`) Hardswish output (`embedding_dim` = 6 x last
    block width, 960 for dymn10).

    Kernel-attention temperature: every DynamicConv divides its attention logits by a temperature
    that starts at `t_max` and follows `temperature_at` when the training loop calls
    `update_params(epoch)` once per epoch (EfficientAT's API); `set_temperature(t)` pins it.
    EfficientAT's get_model replaces t_max by `pretrain_final_temp` when it loads weights: build
    with ``t_max=1.0`` to run or fine-tune an AudioSet (`_as`) checkpoint, and keep 30 for
    ImageNet (`_im`) ones or training from scratch. The temperature is not in the state dict.

    `use_dy_blocks="replace_se"` makes only the mn family's SE positions dynamic (the rest are
    plain inverted residuals without SE), as in EfficientAT's dymn*_replace_se checkpoints.
    `input_dim_f` only sets `frontend_config["n_mels"]`; DyMN has no input-size-bound layers.
    """

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 527,
        head_type: str = "mlp",
        use_dy_blocks: str = "all",
        strides: tuple[int, int, int, int] = (2, 2, 2, 2),
        in_channels: int = 1,
        in_conv_kernel: int = 3,
        in_conv_stride: int = 2,
        input_dim_f: int = 128,
        t_max: float = 30.0,
        t_min: float = 1.0,
        t0_slope: float = 1.0,
        t1_slope: float = 0.02,
        bn_momentum: float = BN_MOMENTUM,
    ):
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
        if use_dy_blocks not in DY_BLOCK_PLACEMENTS:
            raise ValueError(f"use_dy_blocks must be one of {DY_BLOCK_PLACEMENTS}, got {use_dy_blocks!r}")
        if len(strides) != 4:
            raise ValueError(f"strides must have 4 entries (blocks 2, 4, 7, 13), got {strides!r}")
        self.width = width
        self.num_classes = num_classes
        self.head_type = head_type
        self.frontend_config = {"kind": "mel", "sample_rate": 32000, "n_mels": input_dim_f, "hop_length": 320}
        self.schedule = {"t_max": t_max, "t_min": t_min, "t0_slope": t0_slope, "t1_slope": t1_slope}

        configs = block_configs(width, tuple(strides))
        # "replace_se" keeps static blocks where MobileNetV3 has no SE; use_se marks exactly those positions.
        # `layers` is registered before `in_c`, as in EfficientAT, so state-dict key order matches too.
        self.layers = nn.ModuleList(
            DyBlock(cfg, width) if use_dy_blocks == "all" or cfg.use_se else InvertedResidual(cfg, None)
            for cfg in configs
        )
        self.in_c = _conv_bn_act(in_channels, configs[0].in_channels, in_conv_kernel, in_conv_stride,
                                 activation=nn.Hardswish)
        last_block_out = configs[-1].out_channels
        self.embedding_dim = 6 * last_block_out
        self.out_c = _conv_bn_act(last_block_out, self.embedding_dim, 1, activation=nn.Hardswish)

        if head_type == "mlp":
            hidden = make_divisible(_LAST_CHANNEL * width)
            self.classifier = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(1),
                nn.Linear(self.embedding_dim, hidden),
                nn.Hardswish(),
                nn.Dropout(p=MLP_DROPOUT),
                nn.Linear(hidden, num_classes),
            )
        else:
            self.classifier = nn.Sequential(
                nn.Conv2d(self.embedding_dim, num_classes, 1, bias=False),
                nn.BatchNorm2d(num_classes),  # PyTorch defaults here, as in EfficientAT
                nn.AdaptiveAvgPool2d(1),
            )
        self._init_weights()
        self.set_temperature(t_max)
        for module in (self.in_c, self.layers, self.out_c):  # body only, as in the mn family
            for bn in module.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.momentum = bn_momentum

    def _init_weights(self) -> None:
        """EfficientAT's init: kaiming fan-out convs, unit/zero BN, N(0, 0.01) linears, zero biases.

        DynamicConv kernels are not nn.Conv2d and keep their own per-kernel kaiming init.
        """
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

    @property
    def temperature(self) -> float:
        """The kernel-attention temperature every DynamicConv currently uses."""
        return next(m.temperature for m in self.modules() if isinstance(m, DynamicConv))

    def set_temperature(self, temperature: float) -> None:
        """Pin the kernel-attention temperature of every DynamicConv (e.g. 1.0 for a trained model)."""
        for m in self.modules():
            if isinstance(m, DynamicConv):
                m.temperature = temperature

    def update_params(self, epoch: float) -> float:
        """EfficientAT's per-epoch hook: set the temperature from the schedule for `epoch`; returns it."""
        temperature = temperature_at(epoch, **self.schedule)
        self.set_temperature(temperature)
        return temperature

    def forward(
        self, x: torch.Tensor, return_embedding: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, num_classes), plus the pooled last-conv embedding (B, embedding_dim) if asked."""
        fmap = self.in_c(x)
        for layer in self.layers:
            fmap = layer(fmap)
        fmap = self.out_c(fmap)
        logits = self.classifier(fmap).flatten(1)
        if return_embedding:
            return logits, fmap.mean(dim=(2, 3))
        return logits
