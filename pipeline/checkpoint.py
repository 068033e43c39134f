"""Save, resume, export and initialise: what a stage's weights are and where they come from.

Resume precedence, coded in this order in `plan_resume` (before the engine exists; `restore` loads the plan into it):
  1. the stage's own latest complete checkpoint (a rerun after a kill continues; a finished stage is not re-run),
  2. the stage's `resume_from`: another run's checkpoint, full state (weights, optimiser, schedule, step, data),
  3. the stage's `init_from`: an earlier stage's export or a weights file (`pipeline.weights`), weights only,
     grown to the stage's resolution (paper App. C) when its image_size is K times its source's,
  4. scratch.
A checkpoint is loaded only if its manifest's checksums hold and it was written by a compatible config
(`check_compatible`): a different model shape, data set or ZeRO stage is refused, naming what differs.
A checkpoint written by another number of ranks is converted once into DeepSpeed's universal format
(`<tag>/universal/`) and loaded from there; the data position is remapped by the stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import dist, rng, weights
from pipeline.config import ConfigError, ExperimentConfig, StageConfig
from pipeline.data.index import ShardIndex
from pipeline.layout import RunLayout, StageLayout
from pipeline.models.mixer import MixerSpec, MlpMixer, grow_resolution

if TYPE_CHECKING:
    from pipeline.engine import Engine

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # written last: a checkpoint without one is incomplete and never `latest`
LATEST = "latest"
UNIVERSAL = "universal"  # inside a tag: its universal conversion, for another number of ranks
HASHES = "hashes"  # background saves: each rank's list of the files it wrote, with sizes and SHA-256
META = "meta.json"  # step, fingerprint and settings as JSON: checked before DeepSpeed reads any tensor


def _engine():
    """`pipeline.engine`, imported at first use: it imports deepspeed (~6 s of start-up), which a process that only
    plans and launches stages (`mixer run`, `mixer submit`) never needs."""
    from pipeline import engine

    return engine


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded: corrupt, incomplete, or written by an incompatible config."""


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _data_file(directory: Path, tag: str, rank: int) -> Path:
    return directory / tag / "data" / f"rank{rank:05d}.json"


def _rng_file(directory: Path, tag: str, rank: int) -> Path:
    return directory / tag / "rng" / f"rank{rank:05d}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_tags(directory: Path) -> list[str]:
    """Tags with a manifest, oldest first."""
    return sorted(p.parent.name for p in directory.glob(f"*/{MANIFEST}"))


def latest_tag(directory: Path) -> str | None:
    path = directory / LATEST
    return path.read_text().strip() if path.exists() else None


class Saver:
    """Atomic saves of one stage's checkpoints: everything needed to continue, `latest` moved only once complete.

    Every rank writes its shard and its data position (`<tag>/data/rank<r>.json`) and hashes files; then rank 0
    writes `<tag>/manifest.json` (every file's size and SHA-256) and only then moves `latest` to the new tag, by
    rename. A kill at any moment leaves `latest` on a complete checkpoint. With `keep` > 0, older complete
    checkpoints beyond the newest `keep` are deleted after that.

    Blocking (default): the ranks share the hashing and meet in collectives; `save` returns when the checkpoint
    is complete. With `background`, `save` returns once the state is copied to host memory: a thread per rank
    writes the files, hashes those it wrote into `<tag>/hashes/rank<r>.json`, and rank 0's thread, once every
    rank's list is there, writes the manifest and moves `latest`, with no collective off the main thread.
    `wait` blocks until this rank's part of the last save is done (on rank 0: the whole checkpoint).
    """

    def __init__(
        self, engine: Engine, directory: Path, *, rank: int, world_size: int, keep: int, background: bool
    ) -> None:
        self.engine, self.directory = engine, directory
        self.rank, self.world_size, self.keep, self.background = rank, world_size, keep, background
        self._finishing: threading.Thread | None = None
        self._error: BaseException | None = None
        if background:
            _engine().write_in_background(engine)

    def save(self, step: int, client_state: dict, data_state: dict | None = None, rng_state: dict | None = None) -> str:
        """Collective: checkpoint `step` with this rank's data position and random generators; returns its tag."""
        self.wait()  # one save in flight at a time
        directory, tag, rank = self.directory, tag_for(step), self.rank
        own = []
        for path, state in (
            (_data_file(directory, tag, rank), data_state),
            (_rng_file(directory, tag, rank), rng_state),
        ):
            if state is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(state))
                own.append(path)
        if rank == 0:
            (directory / tag).mkdir(parents=True, exist_ok=True)
            (directory / tag / META).write_text(json.dumps({"step": step, **client_state}))
            own.append(directory / tag / META)
        _engine().save_checkpoint(self.engine, directory, tag, {"step": step, **client_state})
        if not self.background:
            dist.barrier()  # every rank's files are on disk
            files = _files(directory / tag)[rank :: self.world_size]
            entries = {k: v for part in dist.all_gather_objects(self._hashes(tag, files)) for k, v in part.items()}
            if rank == 0:
                self._complete(tag, step, entries)
            dist.barrier()
            return tag
        self._finishing = threading.Thread(
            target=self._finish, args=(tag, step, own), name=f"checkpoint-{tag}", daemon=True
        )
        self._finishing.start()
        return tag

    def wait(self) -> None:
        """Until this rank's part of the last save is on disk (rank 0: until the checkpoint is complete)."""
        if self._finishing is not None:
            self._finishing.join()
            self._finishing = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint in the background failed: {error}") from error

    def _finish(self, tag: str, step: int, own: list[Path], timeout_s: float = 3600) -> None:
        try:
            hashes = self._hashes(tag, own + _engine().saved_files(self.engine))
            (self.directory / tag / HASHES).mkdir(parents=True, exist_ok=True)
            _atomic_write(self.directory / tag / HASHES / f"rank{self.rank:05d}.json", json.dumps(hashes))
            if self.rank != 0:
                return
            deadline = time.monotonic() + timeout_s
            while len(parts := sorted((self.directory / tag / HASHES).glob("rank*.json"))) < self.world_size:
                if time.monotonic() > deadline:  # a rank died: the checkpoint stays incomplete, never `latest`
                    raise TimeoutError(f"{len(parts)} of {self.world_size} ranks finished writing {tag}")
                time.sleep(0.2)
            self._complete(tag, step, {k: v for p in parts for k, v in json.loads(p.read_text()).items()})
        except BaseException as err:  # noqa: BLE001  (re-raised on the main thread by `wait`)
            self._error = err

    def _hashes(self, tag: str, files: list[Path]) -> dict[str, list]:
        return {str(p.relative_to(self.directory / tag)): [p.stat().st_size, _sha256(p)] for p in files}

    def _complete(self, tag: str, step: int, entries: dict[str, list]) -> None:
        """Rank 0: the manifest, then `latest`, then pruning."""
        manifest = {"tag": tag, "step": step, "world_size": self.world_size, "files": dict(sorted(entries.items()))}
        _atomic_write(self.directory / tag / MANIFEST, json.dumps(manifest, indent=1))
        _atomic_write(self.directory / LATEST, tag)
        if self.keep > 0:
            for old in complete_tags(self.directory)[: -self.keep]:
                if old != tag:
                    shutil.rmtree(self.directory / old, ignore_errors=True)


def verify(directory: Path, tag: str, rank: int = 0, world_size: int = 1) -> None:
    """Collective: every file of the checkpoint has the size and SHA-256 its manifest lists, and every pickle in
    it (listed or not: a universal conversion is made after the manifest) holds only what DeepSpeed's checkpoints
    hold (`engine.safe_load`); the ranks share the work. Otherwise `CheckpointError` on every rank, naming the
    files. A manifest proves integrity only, since whoever wrote the folder can rewrite it: the pickle check is
    what keeps a foreign checkpoint from running code when DeepSpeed unpickles it."""
    manifest_path = directory / tag / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{directory / tag} has no {MANIFEST}: it is incomplete (a save was interrupted)")
    listed = sorted(json.loads(manifest_path.read_text())["files"].items())
    problems = []
    for name, (size, digest) in listed[rank::world_size]:
        path = directory / tag / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
        elif _sha256(path) != digest:
            problems.append(f"{name} does not match its SHA-256 in the manifest")
    for path in sorted((directory / tag).rglob("*.pt"))[rank::world_size]:
        try:
            _engine().safe_load(path, mmap=True)
        except _engine().UnsafeCheckpoint as err:
            problems.append(str(err))
        except Exception as err:  # truncated or not a torch file: its size or digest is reported above, if listed
            problems.append(f"{path.relative_to(directory / tag)} does not load: {str(err).splitlines()[0]}")
    problems = [p for part in dist.all_gather_objects(problems) for p in part]
    if problems:
        raise CheckpointError(f"checkpoint {directory / tag} is corrupt, refusing to load it: " + "; ".join(problems))


def newest_verified(directory: Path, rank: int = 0, world_size: int = 1) -> tuple[str | None, list[str]]:
    """Collective: the newest checkpoint under `directory` that `verify` passes (None if there is none at all),
    and why each newer one was passed over. `latest` is a hint, not the rule: with it deleted, or with the newest
    checkpoint damaged since, the stage continues from the next one instead of training from step 0 over its
    checkpoints. Checkpoints that all fail are a `CheckpointError`, naming each."""
    tags = complete_tags(directory)
    skipped = []
    pointed = latest_tag(directory)
    if pointed is None and tags:
        skipped.append(f"{directory / LATEST} is missing")
    elif pointed is not None and pointed not in tags:
        skipped.append(f"{directory / LATEST} names {pointed}, which has no {MANIFEST}")
    for tag in reversed(tags):
        try:
            verify(directory, tag, rank, world_size)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        return tag, skipped
    if tags:
        raise CheckpointError(
            f"none of the {len(tags)} checkpoints under {directory} can be loaded: "
            + "; ".join(skipped)
            + f"; move {directory} away to start the stage over"
        )
    return None, skipped


def resume_source(resume_from: str) -> tuple[Path, str]:
    """`resume_from` -> (checkpoints folder, tag): a `step-N` folder, or a checkpoints folder (its latest)."""
    path = Path(resume_from)
    if (path / MANIFEST).exists():
        return path.parent, path.name
    tag = latest_tag(path)
    if tag is None:
        raise ConfigError(f"resume_from {resume_from}: neither a checkpoint (no {MANIFEST}) nor a folder of them")
    return path, tag


# Fingerprint keys newer than some checkpoints, with the value those checkpoints were written under.
FINGERPRINT_DEFAULTS = {"stacked": False}


def check_compatible(saved: dict, current: dict) -> None:
    """Refuse a checkpoint whose fingerprint (model shape, classes, data set, ZeRO stage, parameter layout) differs
    from this config's, naming each difference."""
    saved = {**FINGERPRINT_DEFAULTS, **saved}
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, config {current[key]!r}"
        for key in current
        if saved.get(key) != current[key]
    ]
    if differences:
        raise CheckpointError("the checkpoint was written by an incompatible config; " + "; ".join(differences))


def changed_settings(saved: dict, current: dict) -> list[str]:
    """Settings (flattened keys) that differ from the checkpoint's without making it unreadable."""
    return sorted(k for k in current.keys() | saved.keys() if saved.get(k) != current.get(k))


def saved_world_size(directory: Path, tag: str) -> int:
    """How many ranks wrote checkpoint `tag` (from its manifest; an incomplete one is refused)."""
    manifest = directory / tag / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{directory / tag} has no {MANIFEST}: it is incomplete (a save was interrupted)")
    return int(json.loads(manifest.read_text())["world_size"])


def check_reshardable(saved_ranks: int, world_size: int, optimizer: str, zero_stage: int) -> None:
    """Refuse a world-size change that DeepSpeed's universal conversion cannot carry exactly (`engine.to_universal`)."""
    if saved_ranks == world_size:
        return
    change = f"the checkpoint was written by {saved_ranks} ranks, this job has {world_size}"
    if optimizer != "adamw":
        raise CheckpointError(
            f"{change}, and DeepSpeed's universal checkpoint conversion carries only Adam's optimiser state, not "
            f"{optimizer}'s: resume this stage on {saved_ranks} ranks"
        )
    if zero_stage == 3:
        raise CheckpointError(
            f"{change}, and DeepSpeed's universal conversion of ZeRO-3 checkpoints does not restore the Adam "
            f"moments exactly: resume this stage on {saved_ranks} ranks"
        )


def universal(directory: Path, tag: str, rank: int = 0) -> Path:
    """Collective: checkpoint `tag`'s universal conversion, made once by rank 0 (atomically: converted under a
    temporary name, then renamed) and reused by later resumes."""
    target = directory / tag / UNIVERSAL
    if rank == 0 and not target.exists():
        tmp = target.with_name(UNIVERSAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _engine().to_universal(directory / tag, tmp)
        os.replace(tmp, target)
    dist.barrier()
    return target


def resume(
    engine: Engine,
    directory: Path,
    tag: str,
    fingerprint: dict,
    rank: int = 0,
    world_size: int = 1,
    reshard: bool = False,
) -> dict:
    """Collective: check checkpoint `tag` under `directory` (which `verify` passed) against this config's
    fingerprint, then load it (from its universal conversion when `reshard`: another number of ranks wrote it, and
    the engine was built with `load_universal`); returns its client state."""
    meta = json.loads((directory / tag / META).read_text())
    check_compatible(meta.get("fingerprint", {}), fingerprint)
    if reshard:
        _engine().load_checkpoint(engine, directory / tag, universal(directory, tag, rank).name)
    else:
        _engine().load_checkpoint(engine, directory, tag)
    return meta


def data_state(directory: Path, tag: str, rank: int) -> dict | None:
    """This rank's saved data position in checkpoint `tag`; rank 0's when the job had fewer ranks (the stream
    then remaps it by global sample count)."""
    for r in (rank, 0):
        path = _data_file(directory, tag, r)
        if path.exists():
            return json.loads(path.read_text())
    return None


def rng_state(directory: Path, tag: str, rank: int) -> dict | None:
    """This rank's random generators as saved in checkpoint `tag` (none for a rank the writing job did not have)."""
    path = _rng_file(directory, tag, rank)
    return json.loads(path.read_text()) if path.exists() else None


def fingerprint(cfg: ExperimentConfig, stage: StageConfig, spec: MixerSpec, sources: tuple[ShardIndex, ...]) -> dict:
    """What a checkpoint must share with the config that loads it. The data set is known by its training sources'
    shard counts (`data.sources.training_sources`), not its location: copying shards to another disk is harmless."""
    dataset = cfg.datasets[stage.dataset]
    return {
        "model": dataclasses.asdict(spec),
        "gelu": cfg.model.gelu,
        "num_classes": dataset.num_classes,
        "dataset": [[len(s.urls), s.num_samples, s.weight] for s in sources],
        "zero_stage": _engine().zero_stage_of(stage, cfg.deepspeed),
        "stacked": cfg.model.stacked,  # the order of the parameters in ZeRO's flat partitions
    }


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """Where a stage's state comes from, decided before its engine exists: a verified checkpoint to continue
    (`directory`/`tag`, full state), or a weights file to start from (`init`, weights only), or neither (scratch)."""

    directory: Path | None = None
    tag: str | None = None
    saved_world_size: int = 0
    init: Path | None = None

    @property
    def resumes(self) -> bool:
        return self.tag is not None

    def reshard(self, world_size: int) -> bool:
        """Another number of ranks wrote the checkpoint: the engine loads its universal conversion."""
        return self.resumes and self.saved_world_size != world_size


def plan_resume(stage: StageConfig, run: RunLayout, zero_stage: int, rank: int = 0, world_size: int = 1) -> ResumePlan:
    """Collective: the stage's source of state, by the precedence in this module's docstring. A checkpoint is
    chosen only once `verify` passes it, and only if this world size can load it exactly (`check_reshardable`)."""
    if stage.kind.trains:
        own, passed_over = newest_verified(run.stage(stage.name).checkpoints, rank, world_size)
        if own is not None:
            if passed_over and rank == 0:
                log.warning("stage %s resumes from %s, not a newer one: %s", stage.name, own, "; ".join(passed_over))
            return _continuing(run.stage(stage.name).checkpoints, own, stage, zero_stage, world_size)
        if stage.resume_from is not None:
            directory, tag = resume_source(stage.resume_from)
            verify(directory, tag, rank, world_size)
            return _continuing(directory, tag, stage, zero_stage, world_size)
    if stage.init_from is not None:
        return ResumePlan(init=init_source(stage.init_from, run))
    return ResumePlan()


def _continuing(directory: Path, tag: str, stage: StageConfig, zero_stage: int, world_size: int) -> ResumePlan:
    saved = saved_world_size(directory, tag)
    check_reshardable(saved, world_size, stage.optim.name, zero_stage)
    return ResumePlan(directory, tag, saved)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `restore` put back: the step to continue after, this rank's data position (None: from the start), and
    the tags that tell the stage's run where it came from."""

    step: int = 0
    data_state: dict | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)


def restore(
    engine: Engine, plan: ResumePlan, fingerprint: dict, settings: dict, rank: int = 0, world_size: int = 1
) -> Restored:
    """Collective: load the plan's checkpoint into `engine` (built with `load_universal` where `plan.reshard`),
    refused if its fingerprint differs from this config's; then this rank's data position and random generators.
    Settings that changed harmlessly since the save (more steps, another eval interval, ...) are allowed and
    named in the tags."""
    if not plan.resumes:
        return Restored()
    reshard = plan.reshard(world_size)
    meta = resume(engine, plan.directory, plan.tag, fingerprint, rank, world_size, reshard)
    saved_rng = rng_state(plan.directory, plan.tag, rank)
    if saved_rng is not None:  # the loop reseeds every step from (seed, step) too, so this is belt and braces
        rng.set_rng_states(saved_rng)
    changes = changed_settings(meta.get("settings", {}), settings)
    tags = {"resumed_from": str(plan.directory / plan.tag), "resume_changes": ", ".join(changes)}
    if reshard:
        tags["resumed_world_size"] = f"{plan.saved_world_size} -> {world_size} ranks (universal checkpoint)"
    return Restored(int(meta["step"]), data_state(plan.directory, plan.tag, rank), tags)


def export(
    engine: Engine, layout: StageLayout, tag: str, spec: MixerSpec, num_classes: int, zero_stage: int, gelu: str
) -> Path:
    """Consolidated fp32 weights as safetensors + model.json; call on the primary rank after the save."""
    if zero_stage >= 1:
        state = _engine().consolidated_state_dict(layout.checkpoints, tag)
    else:  # without ZeRO every rank holds the whole model
        state = {k: v.float() for k, v in engine.module.state_dict().items()}
    weights.write_export(weights.Weights(state, spec, num_classes, gelu), layout.weights)
    return layout.weights


def export_checkpoint(source: str | Path, out: str | Path) -> weights.Weights:
    """`mixer export`: a stage folder, a checkpoints folder (its latest) or one `step-N` checkpoint -> consolidated
    fp32 safetensors + model.json at `out`, in one process with no launcher. The manifest is verified first."""
    source = Path(source)
    if (source / "checkpoints").is_dir():
        source = source / "checkpoints"
    directory, tag = resume_source(str(source))
    verify(directory, tag)
    fingerprint = json.loads((directory / tag / META).read_text())["fingerprint"]
    state = _engine().consolidated_state_dict(directory, tag, fingerprint["zero_stage"])
    spec = MixerSpec(**fingerprint["model"])
    exported = weights.Weights(state, spec, fingerprint["num_classes"], fingerprint["gelu"])
    weights.write_export(exported, Path(out))
    return exported


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
