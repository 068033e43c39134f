"""Save, resume, export and initialise: what a stage's weights are and where they come from.

Resume precedence, coded in this order in `train.run_stage`:
  1. the stage's own latest complete checkpoint (a rerun after a kill continues; a finished stage is not re-run),
  2. the stage's `init_from`: an earlier stage's export or a weights file (`pipeline.weights`), weights only,
     grown to the stage's resolution (paper App. C) when its image_size is K times its source's,
  3. scratch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline import engine as eng
from pipeline import weights
from pipeline.config import ConfigError, ExperimentConfig
from pipeline.layout import RunLayout, StageLayout
from pipeline.models.mixer import MixerSpec, MlpMixer, grow_resolution


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _data_file(layout: StageLayout, tag: str, rank: int) -> Path:
    return layout.checkpoints / tag / "data" / f"rank{rank:05d}.json"


def save(
    engine: eng.Engine,
    layout: StageLayout,
    step: int,
    client_state: dict,
    data_state: dict | None = None,
    rank: int = 0,
) -> str:
    """Collective sharded save of everything needed to continue; returns the checkpoint's tag.

    Each rank's data position goes to `<tag>/data/rank<r>.json`, written before DeepSpeed moves `latest`."""
    tag = tag_for(step)
    if data_state is not None:
        path = _data_file(layout, tag, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data_state))
    eng.save_checkpoint(engine, layout.checkpoints, tag, {"step": step, **client_state})
    return tag


def resume(engine: eng.Engine, layout: StageLayout) -> dict | None:
    """Collective: load the stage's latest checkpoint if there is one; returns its client state."""
    if not (layout.checkpoints / "latest").exists():
        return None
    return eng.load_checkpoint(engine, layout.checkpoints)


def data_state(layout: StageLayout, rank: int) -> dict | None:
    """This rank's saved data position in the latest checkpoint; rank 0's when the job had fewer ranks (the
    stream then remaps it by global sample count)."""
    latest = layout.checkpoints / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    for r in (rank, 0):
        path = _data_file(layout, tag, r)
        if path.exists():
            return json.loads(path.read_text())
    return None


def export(
    engine: eng.Engine, layout: StageLayout, tag: str, spec: MixerSpec, num_classes: int, zero_stage: int, gelu: str
) -> Path:
    """Consolidated fp32 weights as safetensors + model.json; call on the primary rank after the save."""
    if zero_stage >= 1:
        state = eng.consolidated_state_dict(layout.checkpoints, tag)
    else:  # without ZeRO every rank holds the whole model
        state = engine.module.state_dict()
    weights.write_export(weights.Weights(state, spec, num_classes, gelu), layout.weights)
    return layout.weights


def load_exported(path: str | Path) -> MlpMixer:
    """The plain model from any weights file `pipeline.weights` reads: no DeepSpeed, no launcher."""
    w = weights.read_weights(path)
    model = MlpMixer(w.spec, w.num_classes, gelu=w.gelu)
    model.load_state_dict(w.state)
    return model


def init_source(init_from: str, run: RunLayout) -> Path:
    """An earlier stage's name -> its export; anything else is a path to a weights file."""
    if (run.root / "stages" / init_from).exists() or not Path(init_from).suffix:
        return run.stage(init_from).weights
    return Path(init_from)


def growth_factor(source: MixerSpec, image_size: int, where: str) -> int:
    """How many times larger per side a stage's images are than its source's; anything but an integer is refused."""
    if image_size % source.image_size:
        raise ConfigError(
            f"{where}: image_size {image_size} cannot be reached from the source's {source.image_size}. A Mixer's "
            f"token-mixing MLP fixes the number of patches, so a new resolution needs each side to grow by an "
            f"integer factor K with the patch size ({source.patch_size}) kept: S' = K^2 S (paper App. C). "
            f"Use {source.image_size * 2}, {source.image_size * 3}, ..."
        )
    return image_size // source.image_size


def stage_specs(cfg: ExperimentConfig, upto: str | None = None) -> dict[str, MixerSpec]:
    """Each stage's model shape: from its source stage or weights file, grown by App. C where its image_size says.

    Called before launch, so a resolution change that cannot work is refused before any process starts. `upto`
    stops after that stage (a stage's ranks need no later stage's source weights read).
    """
    specs: dict[str, MixerSpec] = {}
    for stage in cfg.stages:
        where = f"stages[{stage.name}]"
        if stage.init_from is None:
            base = cfg.model.spec()
            size = stage.image_size or base.image_size
            specs[stage.name] = dataclasses.replace(base, image_size=size)  # scratch: any valid size
        else:
            if stage.init_from in specs:
                base = specs[stage.init_from]
            else:
                base = weights.read_weights(stage.init_from).spec
            factor = growth_factor(base, stage.image_size or base.image_size, where)
            specs[stage.name] = base.grown(factor)
        if stage.name == upto:
            break
    return specs


def init_weights(model: MlpMixer, source: Path, new_head: bool) -> None:
    """Load weights only, grown to the model's resolution if needed. `new_head` keeps the model's fresh zero head
    (fine-tuning on a new label set)."""
    w = weights.read_weights(source)
    state = w.state
    factor = growth_factor(w.spec, model.spec.image_size, str(source))
    if factor > 1:
        state, _ = grow_resolution(state, w.spec, factor)
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"head.weight", "head.bias"} if new_head else set()
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(
            f"weights in {source} do not fit the model: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
