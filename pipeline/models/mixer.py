"""MLP-Mixer (Tolstikhin et al., 2021): blocks -> model -> init -> named variants.

Parameter names follow the official Flax checkpoints one-to-one:
`stem` ~ `stem`, `blocks.{i}.token_norm` ~ `MixerBlock_{i}/LayerNorm_0`,
`blocks.{i}.token_mixing.dense_{k}` ~ `MixerBlock_{i}/token_mixing/Dense_{k}`,
`blocks.{i}.channel_norm` ~ `MixerBlock_{i}/LayerNorm_1`,
`blocks.{i}.channel_mixing.dense_{k}` ~ `MixerBlock_{i}/channel_mixing/Dense_{k}`,
`pre_head_norm` ~ `pre_head_layer_norm`, `head` ~ `head`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torchvision.ops import StochasticDepth, stochastic_depth

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


# One block's parameters, by their names inside `MixerBlock` (in the official checkpoints: MixerBlock_{i}/...).
BLOCK_PARAMETERS = (
    "token_norm.weight",
    "token_norm.bias",
    "token_mixing.dense_0.weight",
    "token_mixing.dense_0.bias",
    "token_mixing.dense_1.weight",
    "token_mixing.dense_1.bias",
    "channel_norm.weight",
    "channel_norm.bias",
    "channel_mixing.dense_0.weight",
    "channel_mixing.dense_0.bias",
    "channel_mixing.dense_1.weight",
    "channel_mixing.dense_1.bias",
)

Layer = Callable[[torch.Tensor], torch.Tensor]


def mixer_block(
    x: torch.Tensor, token_norm: Layer, mix_tokens: Layer, channel_norm: Layer, mix_channels: Layer, drop: Layer
) -> torch.Tensor:
    """One Mixer block on x (B, S, C): token mixing across patches (shared over channels), then channel mixing
    (shared over patches), each a pre-norm residual branch."""
    y = token_norm(x).transpose(1, 2)  # (B, C, S): mix along S
    x = x + drop(mix_tokens(y).transpose(1, 2))
    return x + drop(mix_channels(channel_norm(x)))


def mlp(
    y: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    act: Layer,
    pad: int = 0,
    fused: bool = False,
) -> torch.Tensor:
    """Dense -> act -> Dense over the last axis of y. With `pad`, that axis runs padded with `pad` zeros: zero inputs
    times zero weight columns add nothing, and the padded outputs are cut off, so the result is the same. With
    `fused` (`model.fused_gelu`; act is then the tanh GELU), on a GPU, the MLP runs through cuBLASLt's GELU epilogues
    (`models.fused`); elsewhere this plain path, its reference, runs. The channel-mixing MLPs run fused, the
    token-mixing ones do not: fused too (B/16, batch 256, H200) their GELUs' 3.4 ms per step went, but their GEMMs
    and the host's time per cuBLASLt call added as much back, and the peak memory rose by 1.1 GiB
    (docs/BENCHMARKS.md)."""
    if pad:
        y, w0 = F.pad(y, (0, pad)), F.pad(w0, (0, pad))
        w1, b1 = F.pad(w1, (0, 0, 0, pad)), F.pad(b1, (0, pad))
    if fused and y.is_cuda:
        from pipeline.models.fused import gelu_mlp

        out = gelu_mlp(y, w0, b0, w1, b1)
    else:
        out = F.linear(act(F.linear(y, w0, b0)), w1, b1)
    return out[..., :-pad] if pad else out


# What a block keeps for its backward pass (`remat`): "none" everything autograd saves; "matmuls" only the matrix
# products' outputs, the LayerNorms, GELUs and the rest recomputed from them; "blocks" only the block's input, the
# whole block recomputed. Recomputation replays the block's random draws (stochastic depth) as they were.
REMAT = ("none", "matmuls", "blocks")
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


_CHECKPOINT = {"use_reentrant": False}
if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters:  # torch >= 2.14
    # What "matmuls" keeps goes through saved-tensor hooks (torch.autograd.graph.save_on_cpu) as anything else would
    _CHECKPOINT["respect_saved_tensors_hooks"] = True


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def rematerialised(block: Layer, x: torch.Tensor, remat: str) -> torch.Tensor:
    """`block(x)`, keeping for the backward pass what `remat` says (REMAT); plain `block(x)` where nothing is
    recorded for a backward pass (evaluation)."""
    if remat == "none" or not (torch.is_grad_enabled() and x.requires_grad):
        return block(x)
    if remat == "matmuls":
        return checkpoint(
            block, x, context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls), **_CHECKPOINT
        )
    return checkpoint(block, x, **_CHECKPOINT)


def bytes_kept_for_backward(model: nn.Module, images: torch.Tensor) -> int:
    """Bytes of the tensors a forward pass of `model` keeps for its backward pass (each storage counted once), then
    runs the backward pass. Parameters and the input count too where autograd keeps them."""
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(images).float().sum().backward()
    return sum(storages.values())


def _token_pad(spec: MixerSpec) -> int:
    """Zeros that pad the patch axis to a multiple of 16 (196 -> 208 at 224/16): rows of 196 bf16 values are not
    16-byte aligned, and cuBLAS then falls back to GEMMs 2-3x slower (docs/BENCHMARKS.md)."""
    return -spec.num_patches % 16


def _gelu(gelu: str) -> nn.GELU:
    # "exact" is torch's and timm's GELU; "tanh" is Flax's default approximation.
    return nn.GELU(approximate="tanh" if gelu == "tanh" else "none")


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dense, applied over the last axis (`fused`: see `mlp`)."""

    def __init__(self, dim: int, mlp_dim: int, gelu: str, fused: bool = False) -> None:
        super().__init__()
        self.dense_0 = nn.Linear(dim, mlp_dim)
        self.act = _gelu(gelu)
        self.dense_1 = nn.Linear(mlp_dim, dim)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d0, d1 = self.dense_0, self.dense_1
        if self.fused:
            return mlp(x, d0.weight, d0.bias, d1.weight, d1.bias, self.act, fused=True)
        # Through the modules: `deepspeed.fp8` swaps them for float8 ones, and ZeRO-3 gathers their weights as they run
        return d1(self.act(d0(x)))


class MixerBlock(nn.Module):
    """Token mixing across patches (shared over channels), then channel mixing (shared over patches)."""

    def __init__(self, spec: MixerSpec, drop_path: float, gelu: str, fused_gelu: bool = False) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(spec.hidden_dim, eps=LAYER_NORM_EPS)
        # Over the patch axis through a transposed view: measured on an H100, torch.compile fuses these transposes
        # into the neighbouring kernels, and that beat a transpose-free batched matmul (docs/BENCHMARKS.md).
        self.token_mixing = MlpBlock(spec.num_patches, spec.tokens_mlp_dim, gelu)  # never fused: see `mlp`
        self.token_pad = _token_pad(spec)
        self.channel_norm = nn.LayerNorm(spec.hidden_dim, eps=LAYER_NORM_EPS)
        self.channel_mixing = MlpBlock(spec.hidden_dim, spec.channels_mlp_dim, gelu, fused_gelu)
        # "row" drops the whole residual branch per sample, as stochastic depth does.
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, C)
        return mixer_block(x, self.token_norm, self._mix_tokens, self.channel_norm, self.channel_mixing, self.drop_path)

    def _mix_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """`token_mixing(y)`, with the patch axis padded by `token_pad` zeros (ZeRO-3 gathers the weights with the
        block: `engine.build_engine`)."""
        if not self.token_pad:
            return self.token_mixing(y)
        m = self.token_mixing
        return mlp(y, m.dense_0.weight, m.dense_0.bias, m.dense_1.weight, m.dense_1.bias, m.act, self.token_pad)


class Blocks(nn.Sequential):
    """The N `MixerBlock`s in order, each run through `rematerialised` (`remat`)."""

    def __init__(self, blocks: list[MixerBlock], remat: str = "none") -> None:
        super().__init__(*blocks)
        self.remat = remat

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, C)
        for block in self:
            x = rematerialised(block, x, self.remat)
        return x


class StackedBlocks(nn.Module):
    """The N Mixer blocks with each of a block's 12 parameters stacked along a leading block axis: 12 parameter
    tensors in all, instead of 12 N, and the same arithmetic as N `MixerBlock`s.

    DeepSpeed's ZeRO does its host-side bookkeeping (gradient hooks, bucket copies, norms) once per parameter
    tensor; at H/14's 390 tensors that host work outlasted the GPU's step (docs/BENCHMARKS.md). `state_dict()` and
    `load_state_dict()` speak the per-block names (`blocks.{i}.token_norm.weight`), so weight files are the same
    either way; ZeRO's own checkpoint partitions follow the stacked layout."""

    def __init__(
        self, spec: MixerSpec, drop_paths: list[float], gelu: str, remat: str = "none", fused_gelu: bool = False
    ) -> None:
        super().__init__()
        n = spec.num_blocks
        self.remat = remat
        self.channel_mlp = partial(mlp, fused=fused_gelu)
        # One block's parameters as MixerBlock makes them (names, shapes, LayerNorm ones and zeros), N times over.
        block = dict(MixerBlock(spec, 0.0, gelu).named_parameters())
        for name in BLOCK_PARAMETERS:
            *path, leaf = name.split(".")
            owner = self
            for part in path:  # plain modules that only name the parameters, as in MixerBlock
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            one = block[name].detach()
            owner.register_parameter(leaf, nn.Parameter(one.expand(n, *one.shape).clone()))
        self.hidden_dim, self.token_pad, self.drop_paths = spec.hidden_dim, _token_pad(spec), drop_paths
        # How the forward pass takes each block's slice: "unbind" all at once (its backward stacks the gradients in
        # one copy), or "select" block by block. `engine.build_engine` picks "select" under DeepCompile (ZeRO-3),
        # which frees a gathered parameter after its last use in the graph: it follows the views `select` makes to
        # their uses, but not the list `unbind` returns.
        self.slicing = "unbind"
        self.act = _gelu(gelu)
        self.register_state_dict_post_hook(_unstack_hook)
        self.register_load_state_dict_pre_hook(_stack_hook)

    def __len__(self) -> int:
        return len(self.drop_paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, C)
        stacked = [self.get_parameter(name) for name in BLOCK_PARAMETERS]
        if self.slicing == "select":
            per_block = ([p[i] for p in stacked] for i in range(len(self)))
        else:
            per_block = zip(*(p.unbind(0) for p in stacked), strict=True)
        for rate, values in zip(self.drop_paths, per_block, strict=True):
            p = dict(zip(BLOCK_PARAMETERS, values, strict=True))
            block = partial(
                mixer_block,
                token_norm=partial(self._norm, weight=p["token_norm.weight"], bias=p["token_norm.bias"]),
                mix_tokens=partial(mlp, **self._dense(p, "token_mixing"), act=self.act, pad=self.token_pad),
                channel_norm=partial(self._norm, weight=p["channel_norm.weight"], bias=p["channel_norm.bias"]),
                mix_channels=partial(self.channel_mlp, **self._dense(p, "channel_mixing"), act=self.act),
                drop=partial(stochastic_depth, p=rate, mode="row", training=self.training),
            )
            x = rematerialised(block, x, self.remat)
        return x

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_dim,), weight, bias, LAYER_NORM_EPS)

    @staticmethod
    def _dense(p: dict[str, torch.Tensor], mixing: str) -> dict[str, torch.Tensor]:
        return {
            "w0": p[f"{mixing}.dense_0.weight"],
            "b0": p[f"{mixing}.dense_0.bias"],
            "w1": p[f"{mixing}.dense_1.weight"],
            "b1": p[f"{mixing}.dense_1.bias"],
        }


def _unstack_hook(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    stacked = {name: state[prefix + name].detach() for name in BLOCK_PARAMETERS}
    if any(v.ndim < 2 for v in stacked.values()):  # ZeRO-3's empty stand-ins for partitioned parameters
        return
    for name in BLOCK_PARAMETERS:
        del state[prefix + name]
    state.update(_per_block(stacked, prefix))


def _per_block(stacked: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Stacked block parameters (names without a block number) as per-block entries, block by block as
    `MixerBlock`s list them; each has its own storage (safetensors refuses tensors that share one)."""
    n = len(next(iter(stacked.values())))
    return {f"{prefix}{i}.{name}": value[i].clone() for i in range(n) for name, value in stacked.items()}


def _stack_hook(module: nn.Module, state: dict, prefix: str, *args) -> None:
    for name in BLOCK_PARAMETERS:
        keys = [f"{prefix}{i}.{name}" for i in range(len(module))]
        if prefix + name not in state and all(k in state for k in keys):
            state[prefix + name] = torch.stack([state.pop(k) for k in keys])


def _stacked_name(key: str) -> str | None:
    """The block parameter a state-dict key names if it is a stacked one (`blocks.` and no block number)."""
    name = key.removeprefix("blocks.")
    return name if name != key and name in BLOCK_PARAMETERS else None


def unstack_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the stacked block parameters (`blocks.token_norm.weight`, (N, C)) split into the per-block
    names (`blocks.{i}.token_norm.weight`), in their place: what ZeRO's consolidation of a stacked model's
    checkpoint gives, in the names every weight file uses."""
    stacked = {name: v for k, v in state.items() if (name := _stacked_name(k))}
    out = {}
    for key, value in state.items():
        if _stacked_name(key) is None:
            out[key] = value
        elif stacked:  # the first stacked key: every block's entries go here
            out.update(_per_block(stacked, "blocks."))
            stacked = {}
    return out


class MlpMixer(nn.Module):
    """Stem -> N Mixer blocks -> pre-head LayerNorm -> mean over patches -> head (zero-initialised)."""

    def __init__(
        self,
        spec: MixerSpec,
        num_classes: int,
        stoch_depth: float = 0.0,
        dropout: float = 0.0,
        gelu: str = "exact",
        stacked: bool = False,
        remat: str = "none",
        fused_gelu: bool = False,
    ) -> None:
        super().__init__()
        spec.validate()
        if fused_gelu and gelu != "tanh":
            raise ValueError("fused_gelu needs the tanh GELU (cuBLASLt's)")
        if remat not in REMAT:
            raise ValueError(f"remat is {remat!r}; one of {REMAT}")
        self.spec = spec
        self.num_classes = num_classes
        p = spec.patch_size
        self.stem = nn.Conv2d(3, spec.hidden_dim, kernel_size=p, stride=p)
        # Stochastic depth rises linearly from 0 at the first block to `stoch_depth` at the last.
        rates = [stoch_depth * i / max(spec.num_blocks - 1, 1) for i in range(spec.num_blocks)]
        # `stacked`: one tensor per block parameter across all blocks (see StackedBlocks); the same model.
        self.blocks = (
            StackedBlocks(spec, rates, gelu, remat, fused_gelu)
            if stacked
            else Blocks([MixerBlock(spec, r, gelu, fused_gelu) for r in rates], remat)
        )
        self.pre_head_norm = nn.LayerNorm(spec.hidden_dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(spec.hidden_dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: LeCun-normal stem, Xavier-uniform dense kernels, zero biases, zero head."""
        fan_in = self.stem.in_channels * self.spec.patch_size**2
        nn.init.trunc_normal_(self.stem.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.stem.bias)
        for name, p in self.blocks.named_parameters():
            if "mixing" in name and name.endswith("bias"):
                nn.init.zeros_(p)
            elif "mixing" in name:  # a dense kernel, or one per block along the stacked axis
                for kernel in p.unbind(0) if p.ndim == 3 else (p,):
                    nn.init.xavier_uniform_(kernel)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logit features (B, C): what few-shot and linear probes read."""
        x = self.stem(images)  # (B, C, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)  # (B, S, C)
        x = self.blocks(x)
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
