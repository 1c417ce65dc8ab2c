"""Multiply-accumulate (MAC) counting for any nn.Module, in EfficientAT's convention.

EfficientAT (after PANNs) counts only the dominant ops, convolutions and linear
layers, with forward hooks; its published MACs are reproduced exactly this way.
What `count_macs` counts, per forward pass of one input of `input_shape`:

- every ``nn.Conv1d/2d/3d``: output elements x (in_channels / groups) x kernel volume;
- every ``nn.Linear``: output elements x in_features (so a Linear applied per token
  counts once per token);
- every DyMN ``DynamicConv`` as the static conv it runs per clip (its kernel mix and
  attention Linear are counted as products and Linears); this reproduces the DyMN
  table's 0.12 / 0.58 / 2.2 GMACs;
- with ``count_matmul=True``, tensor products called outside those modules, as in
  transformer attention: ``torch.matmul`` / ``@`` / ``torch.bmm`` (output elements x
  inner dim), ``F.scaled_dot_product_attention`` (both products, QK^T and AV) and
  ``nn.MultiheadAttention`` (its four projections and both products; its Linear
  submodules are called functionally, so hooks never see them).

Not counted: bias additions, normalisation, activations, pooling, softmax, elementwise
ops, and ``torch.einsum`` / custom kernels. Transposed convs are not handled.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from kdpipe.models.dymn import DynamicConv


def _conv_macs(module: nn.modules.conv._ConvNd, output: torch.Tensor) -> int:
    return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def _dynamic_conv_macs(module: DynamicConv, output: torch.Tensor) -> int:
    return output.numel() * (module.c_in // module.groups) * module.kernel**2


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


class _MatmulCounter(TorchFunctionMode):
    """Counts MACs of functional tensor products (never reached by nn.Linear, which calls F.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self._rules: dict[Callable[..., Any], Callable[..., int]] = {
            torch.matmul: self._product,
            torch.Tensor.matmul: self._product,
            torch.Tensor.__matmul__: self._product,
            torch.bmm: self._product,
            torch.Tensor.bmm: self._product,
            F.scaled_dot_product_attention: self._sdpa,
            F.multi_head_attention_forward: self._mha,
        }

    @staticmethod
    def _product(out: torch.Tensor, a: torch.Tensor, *_: Any, **__: Any) -> int:
        return out.numel() * a.shape[-1]

    @staticmethod
    def _sdpa(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any, **__: Any) -> int:
        rows = math.prod(q.shape[:-1])  # batch x heads x queries
        return rows * k.shape[-2] * (q.shape[-1] + v.shape[-1])

    @staticmethod
    def _mha(out: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any, **__: Any) -> int:
        # nn.MultiheadAttention: sequence-first (L, [N,] E) inputs; q/k/v and output projections
        # to E, then QK^T and AV over all heads (heads x head_dim = E).
        embed = query.shape[-1]
        q_rows, k_rows = query.numel() // embed, key.numel() // key.shape[-1]
        batch = q_rows // query.shape[0]
        projections = q_rows * embed * embed * 2 + k_rows * (key.shape[-1] + value.shape[-1]) * embed
        return projections + batch * query.shape[0] * key.shape[0] * embed * 2

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = self._rules.get(func)
        if rule is not None:
            self.macs += rule(out, *args, **kwargs)
        return out


def count_macs(
    model: nn.Module,
    input_shape: tuple[int, ...] = (1, 1, 128, 1000),
    count_matmul: bool = True,
) -> int:
    """MACs of one eval-mode forward pass on a zero input of `input_shape` (see module docstring).

    The input is created on the model's device, so a model built under
    ``torch.device("meta")`` is counted from shapes alone, without computing.
    The model's train/eval mode is restored afterwards.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    total = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            total += _conv_macs(module, output)
        elif isinstance(module, DynamicConv):
            total += _dynamic_conv_macs(module, output)
        else:
            total += _linear_macs(module, output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, DynamicConv))
    ]
    was_training = model.training
    model.eval()
    counter = _MatmulCounter()
    try:
        with torch.no_grad(), counter if count_matmul else contextlib.nullcontext():
            model(torch.zeros(input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total + counter.macs


def describe(model: nn.Module, seconds: float = 10.0) -> dict[str, Any]:
    """Parameters and MACs of a model for a clip of `seconds` (at most its longest input window).

    Build the model under ``torch.device("meta")`` to get both without allocating weights.
    """
    from kdpipe.frontends import frames_for

    config = model.frontend_config
    frames = min(frames_for(seconds, config), getattr(model, "max_frames", math.inf))
    shape = (1, 1, config["n_mels"], frames)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, shape),
        "input": shape[2:],
        "frontend": f"{config['kind']} @ {config['sample_rate']} Hz",
    }
