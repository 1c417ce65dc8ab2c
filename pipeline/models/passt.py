"""PaSST teacher (Koutini et al., 2022) on timm `Block`s, state-dict compatible with the released `passt-s-*.pt`.

Input: (batch, 1, 128 mel, frames) from PaSST's mel frontend (32 kHz, hop 320,
(logmel + 4.5) / 5). Differences from the published code, all deliberate:
inputs with more time patches than the time embedding raise instead of being
cut (kdpipe.models.windowing covers long clips); patchout always keeps at least one row/column.
"""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.models.vit import PATCH_SIZE, PatchEmbed, init_vit_weights, transformer_blocks

# Constructor kwargs of the released AudioSet checkpoints (all 527 classes, 128 mel
# bins, input_tdim 998 for 10 s). Patchout is AudioSet's training setting; it only
# acts in training mode, so it does not change teacher logits.
_AUDIOSET_PATCHOUT = {"s_patchout_t": 40, "s_patchout_f": 4}
PASST_CONFIGS: dict[str, dict] = {
    **{
        f"passt_s_s{s}": {"fstride": s, "tstride": s, "input_tdim": 998, **_AUDIOSET_PATCHOUT}
        for s in (10, 12, 14, 16)
    },
    "passt_s_20sec": {"fstride": 10, "tstride": 10, "input_tdim": 2000, **_AUDIOSET_PATCHOUT},
    "passt_s_30sec": {"fstride": 10, "tstride": 10, "input_tdim": 3000, **_AUDIOSET_PATCHOUT},
    "passt_l_s10": {"fstride": 10, "tstride": 10, "input_tdim": 998, "depth": 7, **_AUDIOSET_PATCHOUT},
    "passt_tiny": {
        "fstride": 16, "tstride": 16, "input_tdim": 400, "embed_dim": 128, "depth": 2, "num_heads": 2,
        "s_patchout_t": 4, "s_patchout_f": 1,
    },
}


def _keep(n: int, drop: int) -> torch.Tensor:
    """Sorted random subset of range(n) with `drop` entries removed (at least one kept)."""
    return torch.randperm(n)[: max(1, n - drop)].sort().values


class PaSST(nn.Module):
    """Patchout spectrogram transformer with CLS + distillation tokens; logits from the mean of both."""

    def __init__(
        self,
        num_classes: int = 527,
        fstride: int = 10,
        tstride: int = 10,
        input_fdim: int = 128,
        input_tdim: int = 998,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        s_patchout_t: int = 0,
        s_patchout_f: int = 0,
        u_patchout: int = 0,
    ) -> None:
        super().__init__()
        self.s_patchout_t, self.s_patchout_f, self.u_patchout = s_patchout_t, s_patchout_f, u_patchout
        self.tstride = tstride
        self.frontend_config: dict = {"kind": "mel", "sample_rate": 32000, "n_mels": input_fdim, "hop_length": 320}
        # PaSST sizes the grid as input // stride, not by the conv formula; for stride 12
        # and 998 frames that gives 83 time patches where the conv gives 82 (1000 frames: 83).
        f_grid, t_grid = input_fdim // fstride, input_tdim // tstride
        self.patch_embed = PatchEmbed(embed_dim, fstride, tstride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.new_pos_embed = nn.Parameter(torch.zeros(1, 2, embed_dim))
        self.freq_new_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, f_grid, 1))
        self.time_new_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, 1, t_grid))
        self.blocks = transformer_blocks(embed_dim, depth, num_heads)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))
        self.head_dist = nn.Linear(embed_dim, num_classes)  # in every checkpoint, unused by forward
        for p in (self.cls_token, self.dist_token, self.new_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.trunc_normal_(self.freq_new_pos_embed, std=0.02)
        nn.init.trunc_normal_(self.time_new_pos_embed, std=0.02)
        self.apply(init_vit_weights)

    @property
    def max_frames(self) -> int:
        """Longest input (frames) whose time patches fit the time positional embedding."""
        t_grid = self.time_new_pos_embed.shape[-1]
        return (t_grid - 1) * self.tstride + PATCH_SIZE + self.tstride - 1

    def forward(
        self, x: torch.Tensor, return_embedding: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, F, T) mel -> logits (B, C), or (logits, embedding (B, E))."""
        x = self.patch_embed(x)
        f, t = x.shape[-2:]
        f_grid, t_grid = self.freq_new_pos_embed.shape[2], self.time_new_pos_embed.shape[3]
        if f != f_grid:
            raise ValueError(f"input gives {f} frequency patches, the model has {f_grid}: wrong number of mel bins")
        if t > t_grid:
            raise ValueError(f"input of {t} time patches exceeds the model's {t_grid} ({self.max_frames} frames); "
                             "kdpipe.models.windowing covers longer clips")
        # A shorter input uses a slice of the time embedding: a random one in training, the first at eval.
        offset = int(torch.randint(0, t_grid - t + 1, ())) if self.training else 0
        x = x + self.time_new_pos_embed[..., offset : offset + t] + self.freq_new_pos_embed
        if self.training and self.s_patchout_t:
            x = x[..., _keep(t, self.s_patchout_t)]
        if self.training and self.s_patchout_f:
            x = x[:, :, _keep(f, self.s_patchout_f)]
        x = x.flatten(2).transpose(1, 2)
        if self.training and self.u_patchout:
            x = x[:, _keep(x.shape[1], self.u_patchout)]
        tokens = torch.cat((self.cls_token, self.dist_token), dim=1) + self.new_pos_embed
        x = torch.cat((tokens.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.norm(self.blocks(x))
        embedding = (x[:, 0] + x[:, 1]) / 2
        logits = self.head(embedding)
        return (logits, embedding) if return_embedding else logits


def infer_passt_config(state_dict: dict[str, torch.Tensor], input_fdim: int = 128) -> dict:
    """Constructor kwargs that rebuild the model a PaSST checkpoint came from (file names can't be trusted).

    The frequency grid gives the stride (the largest one producing it: 10/12/14/16
    for 12/10/9/8 rows); the time stride is assumed equal, as in every release.
    `input_tdim` is returned as grid * stride, which rebuilds the same grid (the
    releases used 998, which gives the same grid for 10 s models). Shapes do not
    fix the head count: 64-wide heads are assumed (ViT-B, and our tiny configs).
    """
    embed_dim, f_grid = state_dict["freq_new_pos_embed"].shape[1:3]
    t_grid = state_dict["time_new_pos_embed"].shape[3]
    strides = [s for s in range(1, PATCH_SIZE + 1) if input_fdim // s == f_grid]
    if not strides:
        raise ValueError(f"no stride gives {f_grid} frequency patches for {input_fdim} mel bins")
    stride = max(strides)
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    return {
        "num_classes": state_dict["head.1.weight"].shape[0],
        "fstride": stride,
        "tstride": stride,
        "input_fdim": input_fdim,
        "input_tdim": t_grid * stride,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": embed_dim // 64,
    }
