"""AST teacher (Gong et al., 2021) on timm `Block`s, state-dict compatible with the released `audioset_*.pth`.

The released files were saved from DataParallel, so every key starts with
`module.`; `strip_module_prefix` removes it and the rest loads strictly
(`v.*` = the DeiT-B distilled backbone, `mlp_head.0/1` = LayerNorm + Linear).
They also keep the backbone's unused 1000-class ImageNet heads (`v.head`,
`v.head_dist`), which we therefore have too.

Input: (batch, 1, 128 mel, 1024 frames) of Kaldi fbank at 16 kHz, normalised with
the constants in `frontend_config`. The original model takes (batch, frames, mel)
and transposes; we take the frequency-major layout directly, like PaSST.
"""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.frontends import AST_NORM_MEAN, AST_NORM_STD
from kdpipe.models.vit import PATCH_SIZE, PatchEmbed, init_vit_weights, patches, transformer_blocks

AST_CONFIGS: dict[str, dict] = {
    **{f"ast_{s}_{s}": {"fstride": s, "tstride": s} for s in (10, 12, 14, 16)},
    "ast_tiny": {
        "fstride": 16, "tstride": 16, "input_tdim": 256, "embed_dim": 128, "depth": 2, "num_heads": 2,
        "imagenet_classes": 0,
    },
}


class DistilledViT(nn.Module):
    """The parameters of timm's distilled DeiT under AST's `v.` names; AST's forward uses them directly."""

    def __init__(
        self, num_patches: int, embed_dim: int, depth: int, num_heads: int, fstride: int, tstride: int,
        imagenet_classes: int,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim, fstride, tstride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 2, embed_dim))
        self.blocks = transformer_blocks(embed_dim, depth, num_heads)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if imagenet_classes:  # leftovers of the ImageNet init: in the checkpoints, never used
            self.head = nn.Linear(embed_dim, imagenet_classes)
            self.head_dist = nn.Linear(embed_dim, imagenet_classes)


class AST(nn.Module):
    """Audio spectrogram transformer: DeiT-B with overlapping patches; logits from the mean of CLS and DIST."""

    def __init__(
        self,
        num_classes: int = 527,
        fstride: int = 10,
        tstride: int = 10,
        input_fdim: int = 128,
        input_tdim: int = 1024,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        imagenet_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.input_fdim, self.input_tdim = input_fdim, input_tdim
        self.frontend_config: dict = {
            "kind": "fbank", "sample_rate": 16000, "n_mels": input_fdim, "target_frames": input_tdim,
            "norm_mean": AST_NORM_MEAN, "norm_std": AST_NORM_STD,
        }
        num_patches = patches(input_fdim, fstride) * patches(input_tdim, tstride)
        self.v = DistilledViT(num_patches, embed_dim, depth, num_heads, fstride, tstride, imagenet_classes)
        self.mlp_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))
        for p in (self.v.cls_token, self.v.dist_token, self.v.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_vit_weights)

    @property
    def max_frames(self) -> int:
        """The one input length the flattened positional embedding fits (the frontend pads to it)."""
        return self.input_tdim

    def forward(
        self, x: torch.Tensor, return_embedding: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, F, T) fbank -> logits (B, C), or (logits, embedding (B, E))."""
        if tuple(x.shape[-2:]) != (self.input_fdim, self.input_tdim):
            raise ValueError(f"AST expects (B, 1, {self.input_fdim}, {self.input_tdim}), got {tuple(x.shape)}; "
                             "pad shorter inputs in the frontend; kdpipe.models.windowing covers longer ones")
        v = self.v
        x = v.patch_embed(x).flatten(2).transpose(1, 2)  # frequency-major, as timm flattens (H=freq, W=time)
        tokens = torch.cat((v.cls_token, v.dist_token), dim=1).expand(x.shape[0], -1, -1)
        x = torch.cat((tokens, x), dim=1) + v.pos_embed
        x = v.norm(v.blocks(x))
        embedding = (x[:, 0] + x[:, 1]) / 2
        logits = self.mlp_head(embedding)
        return (logits, embedding) if return_embedding else logits


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's `module.` prefix (present in every released AST file); other keys pass unchanged."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def infer_ast_config(state_dict: dict[str, torch.Tensor], input_fdim: int = 128, input_tdim: int = 1024) -> dict:
    """Constructor kwargs that rebuild the model an AST checkpoint came from (prefixed or not).

    `pos_embed` holds a flattened grid, so its length alone fixes the stride only
    for a known input size: pass `input_tdim` (1024 for AudioSet, 128 for the
    speech-commands model). Equal frequency/time strides are assumed, as in every
    release, and 64-wide heads (ViT-B, and our tiny configs): shapes do not fix the head count.
    """
    state_dict = strip_module_prefix(state_dict)
    _, tokens, embed_dim = state_dict["v.pos_embed"].shape
    strides = [s for s in range(1, PATCH_SIZE + 1) if patches(input_fdim, s) * patches(input_tdim, s) == tokens - 2]
    if len(strides) != 1:
        raise ValueError(f"pos_embed of {tokens} tokens matches strides {strides} for {input_fdim}x{input_tdim} input")
    head = state_dict.get("v.head.weight")
    return {
        "num_classes": state_dict["mlp_head.1.weight"].shape[0],
        "fstride": strides[0],
        "tstride": strides[0],
        "input_fdim": input_fdim,
        "input_tdim": input_tdim,
        "embed_dim": embed_dim,
        "depth": len({k.split(".")[2] for k in state_dict if k.startswith("v.blocks.")}),
        "num_heads": embed_dim // 64,
        "imagenet_classes": 0 if head is None else head.shape[0],
    }
