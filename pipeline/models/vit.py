"""The ViT pieces both transformer teachers (PaSST, AST) are built from: overlapping 16x16 patch
embedding, DeiT-style blocks and timm's init, named so both families' checkpoint keys match.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

PATCH_SIZE = 16


class PatchEmbed(nn.Module):
    """16x16 patches with a stride below 16 (overlapping), which timm's PatchEmbed cannot do."""

    def __init__(self, embed_dim: int, fstride: int, tstride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=PATCH_SIZE, stride=(fstride, tstride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, F, T) -> (B, E, F patches, T patches)."""
        return self.proj(x)


def transformer_blocks(embed_dim: int, depth: int, num_heads: int) -> nn.Sequential:
    """DeiT-B style pre-norm blocks; key names match both teachers' checkpoints."""
    # imported here, not at the top: timm brings torchvision and torch._dynamo with it (3 s on a 2-core CPU),
    # which every `kdpipe` command would otherwise pay before doing anything
    from timm.models.vision_transformer import Block

    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.Sequential(
        *(Block(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
    )


def init_vit_weights(module: nn.Module) -> None:
    """timm's ViT init for training from scratch (tiny models); checkpoints overwrite it."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def patches(length: int, stride: int) -> int:
    """Number of 16-wide patches the strided conv produces along an axis of `length`."""
    return (length - PATCH_SIZE) // stride + 1
