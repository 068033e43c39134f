"""MLP-Mixer (Tolstikhin et al., 2021): blocks -> model -> init -> named variants.

Parameter names follow the official Flax checkpoints one-to-one:
`stem` ~ `stem`, `blocks.{i}.token_norm` ~ `MixerBlock_{i}/LayerNorm_0`,
`blocks.{i}.token_mixing.dense_{k}` ~ `MixerBlock_{i}/token_mixing/Dense_{k}`,
`blocks.{i}.channel_norm` ~ `MixerBlock_{i}/LayerNorm_1`,
`blocks.{i}.channel_mixing.dense_{k}` ~ `MixerBlock_{i}/channel_mixing/Dense_{k}`,
`pre_head_norm` ~ `pre_head_layer_norm`, `head` ~ `head`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

# Flax's LayerNorm epsilon; the official checkpoints were trained with it.
LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MixerSpec:
    """The shape of a Mixer. Paper notation: C = hidden_dim, D_S = tokens_mlp_dim, D_C = channels_mlp_dim."""

    num_blocks: int
    patch_size: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    image_size: int = 224

    @property
    def num_patches(self) -> int:
        """S = HW / P^2; fixed by the token-mixing MLP, so a model has one input resolution."""
        return (self.image_size // self.patch_size) ** 2

    def grown(self, factor: int) -> MixerSpec:
        """The shape after App. C's resolution change: K times the side, K^2 tokens and token-mixing units."""
        return replace(self, image_size=self.image_size * factor, tokens_mlp_dim=self.tokens_mlp_dim * factor**2)

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


# Table 1 of the paper (at 224x224).
VARIANTS: dict[str, MixerSpec] = {
    "S/32": MixerSpec(8, 32, 512, 256, 2048),
    "S/16": MixerSpec(8, 16, 512, 256, 2048),
    "B/32": MixerSpec(12, 32, 768, 384, 3072),
    "B/16": MixerSpec(12, 16, 768, 384, 3072),
    "L/32": MixerSpec(24, 32, 1024, 512, 4096),
    "L/16": MixerSpec(24, 16, 1024, 512, 4096),
    "H/14": MixerSpec(32, 14, 1280, 640, 5120),
}


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dense, applied over the last axis."""

    def __init__(self, dim: int, mlp_dim: int, gelu: str) -> None:
        super().__init__()
        self.dense_0 = nn.Linear(dim, mlp_dim)
        # "exact" is torch's and timm's GELU; "tanh" is Flax's default approximation.
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.dense_1 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_1(self.act(self.dense_0(x)))


class MixerBlock(nn.Module):
    """Token mixing across patches (shared over channels), then channel mixing (shared over patches)."""

    def __init__(self, spec: MixerSpec, drop_path: float, gelu: str) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(spec.hidden_dim, eps=LAYER_NORM_EPS)
        # Over the patch axis through a transposed view: measured on an H100, torch.compile fuses these transposes
        # into the neighbouring kernels, and that beat a transpose-free batched matmul (docs/BENCHMARKS.md).
        self.token_mixing = MlpBlock(spec.num_patches, spec.tokens_mlp_dim, gelu)
        # The patch axis runs padded with zeros to a multiple of 16 (196 -> 208 at 224/16): rows of 196 bf16 values
        # are not 16-byte aligned, and cuBLAS then falls back to GEMMs 2-3x slower (docs/BENCHMARKS.md).
        self.token_pad = -spec.num_patches % 16
        self.channel_norm = nn.LayerNorm(spec.hidden_dim, eps=LAYER_NORM_EPS)
        self.channel_mixing = MlpBlock(spec.hidden_dim, spec.channels_mlp_dim, gelu)
        # "row" drops the whole residual branch per sample, as stochastic depth does.
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, C)
        y = self.token_norm(x).transpose(1, 2)  # (B, C, S): mix along S
        x = x + self.drop_path(self._mix_tokens(y).transpose(1, 2))
        x = x + self.drop_path(self.channel_mixing(self.channel_norm(x)))
        return x

    def _mix_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """`token_mixing(y)` with S padded by `token_pad` zeros: zero inputs times zero weight columns add nothing,
        and the padded outputs are cut off, so the result is the same."""
        pad = self.token_pad
        if not pad:
            return self.token_mixing(y)
        mlp = self.token_mixing
        hidden = mlp.act(F.linear(F.pad(y, (0, pad)), F.pad(mlp.dense_0.weight, (0, pad)), mlp.dense_0.bias))
        out = F.linear(hidden, F.pad(mlp.dense_1.weight, (0, 0, 0, pad)), F.pad(mlp.dense_1.bias, (0, pad)))
        return out[..., :-pad]


class MlpMixer(nn.Module):
    """Stem -> N Mixer blocks -> pre-head LayerNorm -> mean over patches -> head (zero-initialised)."""

    def __init__(
        self,
        spec: MixerSpec,
        num_classes: int,
        stoch_depth: float = 0.0,
        dropout: float = 0.0,
        gelu: str = "exact",
    ) -> None:
        super().__init__()
        spec.validate()
        self.spec = spec
        self.num_classes = num_classes
        p = spec.patch_size
        self.stem = nn.Conv2d(3, spec.hidden_dim, kernel_size=p, stride=p)
        # Stochastic depth rises linearly from 0 at the first block to `stoch_depth` at the last.
        rates = [stoch_depth * i / max(spec.num_blocks - 1, 1) for i in range(spec.num_blocks)]
        self.blocks = nn.ModuleList(MixerBlock(spec, r, gelu) for r in rates)
        self.pre_head_norm = nn.LayerNorm(spec.hidden_dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(spec.hidden_dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: LeCun-normal stem, Xavier-uniform dense kernels, zero biases, zero head."""
        fan_in = self.stem.in_channels * self.spec.patch_size**2
        nn.init.trunc_normal_(self.stem.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.stem.bias)
        for block in self.blocks:
            for mlp in (block.token_mixing, block.channel_mixing):
                for dense in (mlp.dense_0, mlp.dense_1):
                    nn.init.xavier_uniform_(dense.weight)
                    nn.init.zeros_(dense.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logit features (B, C): what few-shot and linear probes read."""
        x = self.stem(images)  # (B, C, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)  # (B, S, C)
        for block in self.blocks:
            x = block(x)
        return self.pre_head_norm(x).mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # images: (B, 3, H, W)
        return self.head(self.dropout(self.features(images)))  # (B, num_classes)


def count_params(model: nn.Module, include_head: bool = False) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if include_head or not name.startswith("head."))


def grow_resolution(state: dict[str, torch.Tensor], spec: MixerSpec, factor: int) -> tuple[dict, MixerSpec]:
    """Paper App. C: the token-mixing MLPs for an image `factor` times larger per side, patch size fixed.

    S' = K^2 S tokens and D_S' = K^2 D_S hidden units. The new token grid is cut into K x K sub-grids of the
    original size; the expanded weights are block-diagonal with one copy of the pre-trained MLP per sub-grid, so at
    initialisation each sub-grid is mixed exactly as the pre-trained model mixed a whole image.
    """
    if factor < 1:
        raise ValueError(f"resolution factor must be a positive integer, got {factor}")
    side = spec.image_size // spec.patch_size  # tokens per side before
    big = side * factor
    rows = torch.arange(big).repeat_interleave(big)  # (S',) row-major token order, as the stem flattens
    cols = torch.arange(big).repeat(big)
    block = (rows // side) * factor + cols // side  # which sub-grid each new token belongs to
    pos = (rows % side) * side + cols % side  # its token index inside that sub-grid
    d_s, n_sub = spec.tokens_mlp_dim, factor * factor
    out = dict(state)
    for i in range(spec.num_blocks):
        p = f"blocks.{i}.token_mixing."
        w0, b0 = state[p + "dense_0.weight"], state[p + "dense_0.bias"]  # (D_S, S), (D_S,)
        w1, b1 = state[p + "dense_1.weight"], state[p + "dense_1.bias"]  # (S, D_S), (S,)
        new_w0 = w0.new_zeros(n_sub * d_s, big * big)
        new_w1 = w1.new_zeros(big * big, n_sub * d_s)
        for b in range(n_sub):
            tokens = (block == b).nonzero().squeeze(1)
            hidden = slice(b * d_s, (b + 1) * d_s)
            new_w0[hidden, tokens] = w0[:, pos[tokens]]
            new_w1[tokens, hidden] = w1[pos[tokens], :]
        out[p + "dense_0.weight"], out[p + "dense_0.bias"] = new_w0, b0.repeat(n_sub)
        out[p + "dense_1.weight"], out[p + "dense_1.bias"] = new_w1, b1[pos]
    return out, spec.grown(factor)
