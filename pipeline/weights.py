"""Weights in other layouts: the official Flax `.npz` (vision_transformer, big_vision), timm `mixer_*` state dicts,
and this project's own exports (safetensors + model.json). Everything becomes our parameter names.

Accepted `.npz` layouts: the official paper checkpoints (`stem/kernel`, `MixerBlock_0/LayerNorm_0/scale`, ...)
and big_vision / older Flax training checkpoints, whose keys carry a `params/` or `opt/target/` prefix.
Flax Dense kernels are (in, out) and the stem kernel is HWIO: both are transposed for torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.models.mixer import MixerSpec

FLAX_PREFIXES = ("params/", "opt/target/")
# Our name fragment -> official Flax name fragment, per block.
_BLOCK_PARTS = {
    "token_norm": "LayerNorm_0",
    "token_mixing": "token_mixing",
    "channel_norm": "LayerNorm_1",
    "channel_mixing": "channel_mixing",
}
# timm's MlpMixer names -> ours (same tensor layouts: both are torch).
_TIMM = [
    (r"^stem\.proj\.", "stem."),
    (r"^blocks\.(\d+)\.norm1\.", r"blocks.\1.token_norm."),
    (r"^blocks\.(\d+)\.mlp_tokens\.fc1\.", r"blocks.\1.token_mixing.dense_0."),
    (r"^blocks\.(\d+)\.mlp_tokens\.fc2\.", r"blocks.\1.token_mixing.dense_1."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.channel_norm."),
    (r"^blocks\.(\d+)\.mlp_channels\.fc1\.", r"blocks.\1.channel_mixing.dense_0."),
    (r"^blocks\.(\d+)\.mlp_channels\.fc2\.", r"blocks.\1.channel_mixing.dense_1."),
    (r"^norm\.", "pre_head_norm."),
    (r"^head\.", "head."),
]


@dataclass
class Weights:
    """A state dict in our names, the shape it implies, and the GELU its source was trained with."""

    state: dict[str, torch.Tensor]
    spec: MixerSpec
    num_classes: int
    gelu: str


def infer_spec(state: dict[str, torch.Tensor]) -> tuple[MixerSpec, int]:
    """The Mixer shape implied by a state dict in our names (S from the token-mixing kernel)."""
    hidden_dim, _, patch, _ = state["stem.weight"].shape
    tokens_mlp_dim, num_patches = state["blocks.0.token_mixing.dense_0.weight"].shape
    channels_mlp_dim = state["blocks.0.channel_mixing.dense_0.weight"].shape[0]
    num_blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    side = math.isqrt(num_patches)
    spec = MixerSpec(num_blocks, patch, hidden_dim, tokens_mlp_dim, channels_mlp_dim, side * patch)
    return spec, state["head.weight"].shape[0]


# --------------------------------------------------------------------------- official .npz


def _flax_name(ours: str) -> tuple[str, str]:
    """Our parameter name -> (Flax key, how to convert): 'conv', 'dense', or 'plain'."""
    parts = ours.split(".")
    leaf = parts[-1]
    if parts[0] == "blocks":
        i, module = parts[1], parts[2]
        if module.endswith("norm"):
            return f"MixerBlock_{i}/{_BLOCK_PARTS[module]}/{'scale' if leaf == 'weight' else 'bias'}", "plain"
        dense = parts[3].replace("dense_", "Dense_")
        return f"MixerBlock_{i}/{module}/{dense}/{'kernel' if leaf == 'weight' else 'bias'}", "dense"
    if parts[0] == "stem":
        return f"stem/{'kernel' if leaf == 'weight' else 'bias'}", "conv" if leaf == "weight" else "plain"
    if parts[0] == "pre_head_norm":
        return f"pre_head_layer_norm/{'scale' if leaf == 'weight' else 'bias'}", "plain"
    return f"head/{'kernel' if leaf == 'weight' else 'bias'}", "dense"


def _official_names(num_blocks: int) -> list[str]:
    names = ["stem.weight", "stem.bias"]
    for i in range(num_blocks):
        for module in _BLOCK_PARTS:
            if module.endswith("norm"):
                names += [f"blocks.{i}.{module}.weight", f"blocks.{i}.{module}.bias"]
            else:
                names += [f"blocks.{i}.{module}.dense_{k}.{leaf}" for k in (0, 1) for leaf in ("weight", "bias")]
    return names + ["pre_head_norm.weight", "pre_head_norm.bias", "head.weight", "head.bias"]


def read_npz(path: str | Path) -> Weights:
    """An official or big_vision Mixer `.npz` -> our names and layouts."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    for prefix in FLAX_PREFIXES:
        if all(k.startswith(prefix) for k in arrays):
            arrays = {k[len(prefix) :]: v for k, v in arrays.items()}
    blocks = {int(m.group(1)) for k in arrays if (m := re.match(r"MixerBlock_(\d+)/", k))}
    if "stem/kernel" not in arrays or not blocks:
        raise ValueError(f"{path}: not a Mixer checkpoint (no stem/kernel or MixerBlock_* keys)")
    state = {}
    for name in _official_names(len(blocks)):
        key, kind = _flax_name(name)
        if key not in arrays:
            raise ValueError(f"{path}: missing {key!r} (for {name})")
        value = torch.from_numpy(np.ascontiguousarray(arrays.pop(key))).float()
        if kind == "conv":
            value = value.permute(3, 2, 0, 1)  # HWIO -> OIHW
        elif kind == "dense" and value.ndim == 2:
            value = value.T  # (in, out) -> (out, in)
        state[name] = value.contiguous()
    if arrays:
        raise ValueError(f"{path}: unexpected keys {sorted(arrays)[:5]}")
    spec, num_classes = infer_spec(state)
    # Flax's nn.gelu is the tanh approximation by default; the official models were trained with it.
    return Weights(state, spec, num_classes, gelu="tanh")


def write_npz(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Our state dict -> the official `.npz` layout (opens in vision_transformer and big_vision)."""
    arrays = {}
    for name, value in state.items():
        key, kind = _flax_name(name)
        value = value.detach().float().cpu()
        if kind == "conv":
            value = value.permute(2, 3, 1, 0)  # OIHW -> HWIO
        elif kind == "dense" and value.ndim == 2:
            value = value.T
        arrays[key] = value.contiguous().numpy()
    np.savez(path, **arrays)


# --------------------------------------------------------------------------- timm


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `MlpMixer` state dict -> our names (no layout changes: both are torch)."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in _TIMM:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                out[new] = value
                break
        else:
            raise ValueError(f"not a timm Mixer parameter: {key!r}")
    return out


# --------------------------------------------------------------------------- any file


def read_weights(path: str | Path) -> Weights:
    """Our export (safetensors + model.json), an official/big_vision .npz, or a timm state dict (.pth/.bin
    loaded with weights_only=True, or .safetensors without model.json)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}")
    if path.suffix == ".npz":
        return read_npz(path)
    meta = path.parent / "model.json"
    if path.suffix == ".safetensors" and meta.exists():
        info = json.loads(meta.read_text())
        return Weights(load_file(str(path)), MixerSpec(**info["spec"]), info["num_classes"], info["gelu"])
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    state = from_timm(state) if "stem.proj.weight" in state else state
    spec, num_classes = infer_spec(state)
    return Weights(state, spec, num_classes, gelu="exact")  # timm's Mixer uses torch's exact GELU


def write_export(w: Weights, path: str | Path) -> None:
    """Our export format: fp32 safetensors weights with model.json (shape, classes, GELU) beside them."""
    path = Path(path)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in w.state.items()}, str(path))
    meta = {"spec": dataclasses.asdict(w.spec), "num_classes": w.num_classes, "gelu": w.gelu}
    (path.parent / "model.json").write_text(json.dumps(meta, indent=2))
