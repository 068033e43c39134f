"""Save, resume, export and initialise: what a stage's weights are and where they come from.

Resume precedence, coded in this order in `train.run_stage`:
  1. the stage's own latest complete checkpoint (a rerun after a kill continues; a finished stage is not re-run),
  2. the stage's `init_from`: an earlier stage's export or a .safetensors file (weights only),
  3. scratch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipeline import engine as eng
from pipeline.layout import RunLayout, StageLayout
from pipeline.models.mixer import MixerSpec, MlpMixer


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def save(engine: eng.Engine, layout: StageLayout, step: int, client_state: dict) -> str:
    """Collective sharded save of everything needed to continue; returns the checkpoint's tag."""
    tag = tag_for(step)
    eng.save_checkpoint(engine, layout.checkpoints, tag, {"step": step, **client_state})
    return tag


def resume(engine: eng.Engine, layout: StageLayout) -> dict | None:
    """Collective: load the stage's latest checkpoint if there is one; returns its client state."""
    if not (layout.checkpoints / "latest").exists():
        return None
    return eng.load_checkpoint(engine, layout.checkpoints)


def export(
    engine: eng.Engine,
    layout: StageLayout,
    tag: str,
    spec: MixerSpec,
    num_classes: int,
    zero_stage: int,
    gelu: str,
) -> Path:
    """Consolidated fp32 weights as safetensors + model.json; call on the primary rank after the save."""
    if zero_stage >= 1:
        state = eng.consolidated_state_dict(layout.checkpoints, tag)
    else:  # without ZeRO every rank holds the whole model
        state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(layout.weights))
    layout.model_config.write_text(
        json.dumps({"spec": dataclasses.asdict(spec), "num_classes": num_classes, "gelu": gelu}, indent=2)
    )
    return layout.weights


def load_exported(weights: str | Path) -> MlpMixer:
    """The plain model from an export (no DeepSpeed, no launcher); model.json must sit beside the weights."""
    weights = Path(weights)
    meta = json.loads((weights.parent / "model.json").read_text())
    model = MlpMixer(MixerSpec(**meta["spec"]), meta["num_classes"], gelu=meta["gelu"])
    model.load_state_dict(load_file(str(weights)))
    return model


def init_source(init_from: str, run: RunLayout) -> Path:
    """An earlier stage's name -> its export; anything else is a path to a .safetensors file."""
    stage_weights = run.stage(init_from).weights
    path = stage_weights if (run.root / "stages" / init_from).exists() else Path(init_from)
    if not path.exists():
        raise FileNotFoundError(f"init_from {init_from!r}: {path} does not exist (did that stage finish?)")
    return path


def init_weights(model: MlpMixer, source: Path, new_head: bool) -> None:
    """Load weights only. `new_head` keeps the model's fresh zero head (fine-tuning on a new label set)."""
    state = load_file(str(source))
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"head.weight", "head.bias"} if new_head else set()
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(
            f"weights in {source} do not fit the model: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
