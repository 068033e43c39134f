"""Typed experiment config: YAML load, dotted overrides, validation, dump.

Every setting is documented where it is defined. Loading fails before anything launches, naming the key and the
file: an unknown key, a wrong type or an inconsistent value is a `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.models.mixer import REMAT, VARIANTS, MixerSpec


class StageKind(enum.StrEnum):
    """What a stage does. The rest of the package asks these properties, never the name."""

    PRETRAIN = "pretrain"
    FINETUNE = "finetune"
    EVAL = "eval"

    @property
    def trains(self) -> bool:
        """It takes optimiser steps, saves checkpoints and exports weights (an eval stage only reads them)."""
        return self is not StageKind.EVAL

    @property
    def new_head(self) -> bool:
        """Its `init_from` weights come without their classifier: a new, zero head for a new label set."""
        return self is StageKind.FINETUNE


# Experiment and stage names become job names, rendezvous ids, MLflow run names and folder names: no spaces, no
# shell characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
WEIGHT_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt", ".bin")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the file."""


@dataclass
class ModelConfig:
    """The Mixer's shape. A named `variant` fills the four widths; free dimensions make small models."""

    variant: str | None = None  # one of S/32 S/16 B/32 B/16 L/32 L/16 H/14, or None for free dimensions
    image_size: int = 224  # input side in pixels; fixes S = (image_size / patch_size)^2
    patch_size: int | None = None  # P; given by the variant unless set
    num_blocks: int | None = None  # N Mixer layers
    hidden_dim: int | None = None  # C
    tokens_mlp_dim: int | None = None  # D_S, width of the token-mixing MLP
    channels_mlp_dim: int | None = None  # D_C, width of the channel-mixing MLP
    gelu: str = "exact"  # "exact" (torch/timm) or "tanh" (Flax's default approximation)
    # Each block parameter as one tensor over all N blocks (12 tensors, not 12 N): the same model and weight files,
    # far less per-tensor work in DeepSpeed's ZeRO (docs/BENCHMARKS.md). Not with deepspeed.fp8, which swaps
    # per-block Linear modules; under ZeRO-3 each stacked tensor is gathered for all blocks at once. A checkpoint
    # resumes only under the layout that wrote it.
    stacked: bool = False
    # Activation memory for large micro-batches (L, H): what each block keeps for the backward pass. "none";
    # "matmuls": the matrix products' outputs, LayerNorms and GELUs recomputed; "blocks": the block's input only,
    # the whole block recomputed (one more forward pass). The weights and results are the same.
    remat: str = "none"
    # The channel-mixing MLPs through cuBLASLt's GELU epilogues on GPUs (pipeline.models.fused; needs gelu: tanh and
    # nvmath-python, the `gpu` extra). The same arithmetic in fewer kernels; the CPU runs the plain path.
    fused_gelu: bool = False

    def spec(self) -> MixerSpec:
        """The resolved shape: the variant's widths with any explicitly set dimension on top."""
        base = dataclasses.asdict(VARIANTS[self.variant]) if self.variant else {}
        for name in ("patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"):
            if getattr(self, name) is not None:
                base[name] = getattr(self, name)
        base["image_size"] = self.image_size
        return MixerSpec(**base)


@dataclass
class GenerateConfig:
    """A procedural data set that the project writes as shards when `path` holds none yet (no downloads)."""

    kind: str  # "shapes", "novel-shapes" or "photos" (500x375, 1,000 classes; image_size unused), data.synthetic
    image_size: int = 32
    train_samples: int = 8000
    eval_samples: int = 1000
    seed: int = 0


@dataclass
class SourceConfig:
    """Training shards from anywhere, with a sample-count index (see pipeline.data.sources)."""

    url: str  # a folder or URL prefix holding index.json, or a shard list: brace pattern, `pipe:cmd`, s3://...
    index: str | None = None  # the index, if not `<url>/index.json`; local shards without one are indexed at launch
    weight: float = 1.0  # share of training samples drawn from this source when several are mixed


@dataclass
class DatasetConfig:
    """Shards written by `mixer shards write`: `path/<split>/index.json` lists them with sample counts."""

    path: str
    num_classes: int
    train_split: str = "train"
    eval_split: str = "eval"
    generate: GenerateConfig | None = None
    # Training sources, mixed by weight; empty means `path/train_split`.
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass
class AugmentConfig:
    """Training augmentation (torchvision transforms v2) and evaluation preprocessing."""

    crop: str = "inception"  # "inception" (RandomResizedCrop) or "resize" (whole image, resized)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area range of the inception crop
    flip: bool = True  # random horizontal flip
    randaugment_magnitude: int = 0  # RandAugment(2 layers, m); 0 turns it off
    mixup: float = 0.0  # mixup strength p (Beta(p, p) mixing weights); 0 turns it off
    cutmix: float = 0.0  # CutMix alpha; with mixup too, each batch uses one of the two at random
    eval_crop: str = "resize-crop"  # "resize-crop" (resize then centre crop) or "resmall-crop" (short side)
    eval_resize: float = 1.143  # eval resize side / image_size (256/224)
    extra_eval_crops: list[str] = field(default_factory=list)  # also evaluate these, as eval/<crop>/top1 etc.


@dataclass
class OptimConfig:
    """Optimiser and LR schedule. Defaults depend on the stage kind (see `OptimConfig.for_kind`)."""

    name: str = "adamw"  # "adamw" (decoupled weight decay) or "sgd" (momentum)
    lr: float = 1e-3  # peak learning rate, for the global batch
    weight_decay: float = 0.1  # not applied to biases and LayerNorm parameters
    betas: tuple[float, float] = (0.9, 0.999)  # Adam
    momentum: float = 0.9  # SGD
    schedule: str = "linear"  # after warm-up: "linear" decay to 0 or "cosine" decay to 0
    warmup_steps: int = 10_000  # linear warm-up from 0, in optimiser steps
    grad_clip: float = 1.0  # global-norm gradient clipping; 0 turns it off

    @staticmethod
    def for_kind(kind: StageKind | str) -> OptimConfig:
        """Paper defaults: Adam + linear decay for pre-training; momentum SGD + cosine, no decay, to fine-tune."""
        if kind == StageKind.FINETUNE:
            return OptimConfig(name="sgd", lr=0.03, weight_decay=0.0, schedule="cosine", warmup_steps=500)
        return OptimConfig()


@dataclass
class FewShotConfig:
    """big_vision's few-shot protocol: closed-form ridge regression from frozen pre-logits to +-1 targets."""

    dataset: str | None = None  # a key of `datasets`; its train split gives the shots, its eval split the test
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])
    l2: float = 1024.0  # 2^10
    seeds: int = 3  # each draws its own shots; the logged value is their mean
    max_train_samples: int = 50_000  # features are computed for the first samples of the train split only


@dataclass
class StageConfig:
    """One step of the experiment. Durations are in optimiser steps."""

    name: str
    kind: StageKind  # pretrain, finetune or eval
    dataset: str  # a key of `datasets`
    steps: int = 0  # optimiser steps (0 for eval)
    micro_batch: int = 64  # images per rank per forward pass
    grad_accum: int | None = None  # micro-batches per optimiser step (default 1); excludes global_batch
    global_batch: int | None = None  # images per optimiser step; accumulation is derived from the world size
    image_size: int | None = None  # this stage's input side; a fine-tune may grow its source's by an integer K
    # An earlier stage's name, or a weights file: our .safetensors export, an official/big_vision .npz, or a timm
    # state dict (.pth/.bin/.safetensors). Weights only; a finetune stage gets a new zero head.
    init_from: str | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    stoch_depth: float = 0.0  # stochastic depth at the last block, rising linearly from 0 at the first
    dropout: float = 0.0  # dropout on the pre-logits
    eval_every: int = 0  # steps between evaluations; the stage always evaluates at its end
    eval_batch: int = 256  # images per rank per evaluation batch
    checkpoint_every: int = 0  # steps between sharded checkpoints; the stage always saves at its end
    checkpoint_every_minutes: float = 0.0  # also save when this much time has passed since the last save; 0: off
    checkpoint_keep: int = 3  # complete checkpoints kept (older ones deleted once a newer one is complete); 0: all
    # Write checkpoints in the background: training waits only while the state is copied to host memory, then
    # continues while a thread per rank writes and hashes the files; `latest` moves once all are written.
    checkpoint_async: bool = False
    # A checkpoint to continue from when the stage has none of its own: another run's `stages/<s>/checkpoints`
    # folder (its latest) or one `step-N` folder in it. Full state: weights, optimiser, schedule, step, data position.
    resume_from: str | None = None
    log_every: int = 10  # steps between metric logs (losses are averaged over ranks then)
    zero_stage: int | None = None  # overrides `deepspeed.zero_stage` for this stage
    fewshot: FewShotConfig | None = None  # eval stages: linear few-shot evaluation on frozen features

    def __post_init__(self) -> None:
        self.kind = StageKind(self.kind)  # a stage built in code may name its kind as a string

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimiser step: global batch = micro_batch x accumulation x world size."""
        if self.global_batch is None:
            return self.grad_accum or 1
        per_pass = self.micro_batch * world_size
        if self.global_batch % per_pass:
            raise ConfigError(
                f"stage {self.name}: global_batch {self.global_batch} is not a multiple of micro_batch "
                f"{self.micro_batch} x {world_size} ranks = {per_pass}"
            )
        return self.global_batch // per_pass


@dataclass
class LaunchConfig:
    """How each stage's processes start: torchrun with this many processes per node."""

    # Ranks per node. "auto": one per visible CUDA device on a machine with GPUs (launch.device not "cpu"), else
    # CPU_RANKS; for `mixer submit`, cluster.gpus_per_node (CPU_RANKS when it is 0). Resolved once when the config
    # is loaded (`resolve_ranks`), so the config every rank reads holds the number. More ranks than the node's GPUs,
    # or a number that disagrees with cluster.gpus_per_node, is refused.
    nproc_per_node: int | Literal["auto"] = "auto"
    nnodes: int = 1  # nodes; more than one needs rdzv_endpoint
    rdzv_endpoint: str | None = None  # host:port of the rendezvous (first node) when nnodes > 1
    device: str = "auto"  # "auto" (CUDA if present), "cuda" or "cpu"


@dataclass
class DeepSpeedConfig:
    """Settings of DeepSpeed's engine that the typed config owns; `pipeline.engine` writes the JSON."""

    zero_stage: int = 2  # 0 (plain data parallel), 1, 2 or 3
    # "auto" (bf16 on GPU, fp32 on CPU), "bf16" (bf16 weights, fp32 master copies in the optimiser), "fp32", or
    # "autocast" (fp32 weights and optimiser, bf16 matrix products under torch.autocast: DeepSpeed's torch_autocast)
    precision: str = "auto"
    overlap_comm: bool = True
    reduce_bucket_size: int = 50_000_000  # elements
    # torch.compile the model (in place: parameter names and checkpoints are unchanged). ZeRO-3 training stages on
    # GPUs compile through DeepSpeed's DeepCompile instead, which puts ZeRO's parameter gathers and releases and its
    # gradient reductions in the compiled graph: the model compiled around ZeRO-3's per-module hooks ran at a fifth
    # of ZeRO-2's speed (H/14) or failed in Inductor (B/16) on an H100 (docs/BENCHMARKS.md); ZeRO-3 evaluation
    # stages on GPUs run eager
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode: "default" or "max-autotune-no-cudagraphs"
    # float8 matrix products in the channel-mixing MLPs (torchao; needs a GPU of compute capability 8.9+, such as
    # an H100; emulated on the CPU): "none", or torchao's scaling recipe "tensorwise" or "rowwise"
    fp8: str = "none"


CPU_RANKS = 2  # launch.nproc_per_node "auto" without GPUs: two gloo ranks, so ZeRO really shards
FP8_RECIPES = ("none", "tensorwise", "rowwise")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass
class DataConfig:
    """Streaming settings shared by every stage (pipeline.data.stream says what each mode guarantees)."""

    # "split": each epoch, every rank and loader worker reads its own disjoint share of the shards (reshuffled per
    # epoch); "resampled": shards drawn with replacement, independently per rank and worker.
    mode: str = "split"
    num_workers: int = 2  # loader processes per rank; the data an epoch holds does not depend on it
    shuffle_buffer: int = 2000  # samples shuffled together (consecutive blocks of this many), per source and worker
    decode: str = "cpu"  # "cpu": decode + augment in the loader workers; "gpu": nvJPEG + augmentation on the GPU
    samples_per_epoch: int | None = None  # epoch length in samples; default: the training sources' total
    max_bad_fraction: float = 0.01  # stop with an error when more of the samples read than this are unusable
    open_retries: int = 3  # attempts to open a shard after the first, with exponential back-off, before skipping it


@dataclass
class TrackingConfig:
    """MLflow. The URI comes from here, else MLFLOW_TRACKING_URI, else a SQLite file under runs/."""

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None  # MLflow experiment name; defaults to the config's `name`
    # Each training stage's exported weights (model.safetensors + model.json) as the run's `model` artifact, and a
    # version of the registered model named like the experiment where the store has a registry; false: model.json only
    log_model: bool = True
    # Tracking calls go to the server from a background thread; a run waits this long at its end for those a
    # server outage held up, then reports the rest as dropped (tag tracking/dropped_values) and ends anyway
    # (a preempted stage: at most 15 s, inside the grace period before schedulers kill it).
    flush_timeout_s: float = 120.0


@dataclass
class ClusterJobConfig:
    """One stage's resources on the cluster; each key left out takes `cluster`'s value."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    cpus_per_node: int | None = None
    time: str | None = None
    partition: str | None = None


@dataclass
class ClusterConfig:
    """How `mixer submit` makes each stage a cluster job: one launcher per node (torchrun, started by srun),
    `launch.nproc_per_node` ranks under each, the stages chained so that each starts when the one before finished."""

    nodes: int = 1  # nodes per stage job (launch.nnodes is for `mixer run` only)
    gpus_per_node: int = 0  # GPUs asked for per node (Slurm --gpus-per-node); 0 on CPU-only clusters
    cpus_per_node: int | None = None  # CPU cores per node for the launcher, its ranks and their loader workers
    time: str = "24:00:00"  # Slurm time limit per job, [D-]HH:MM:SS
    partition: str | None = None  # Slurm partition; None: the cluster's default
    requeue: bool = True  # a job stopped by preemption or its time limit saves, exits 75 and is requeued
    signal_seconds: int = 300  # Slurm warns (SIGUSR1) this long before the time limit: time to save
    python: str = "python3"  # the interpreter on the nodes that has the project installed
    rdzv_port: int = 29500  # torchrun's c10d rendezvous on the job's first node
    # Exported in every job and written to its log: the one place for NCCL (and other) environment settings.
    # Values are strings: quote numbers in YAML (NCCL_IB_DISABLE: "1").
    env: dict[str, str] = field(default_factory=dict)
    stages: dict[str, ClusterJobConfig] = field(default_factory=dict)  # per-stage overrides, by stage name
    # Kubernetes (`mixer submit --to k8s`): Kubeflow PyTorchJobs, one pod per node.
    image: str | None = None  # the training image (docker/Dockerfile builds one)
    namespace: str = "default"
    # PersistentVolumeClaim name -> mount path in every pod: shards, output_dir (checkpoints, the resolved config)
    volumes: dict[str, str] = field(default_factory=dict)
    shm_gib: int = 16  # /dev/shm of each pod (a memory-backed volume): loader workers hand batches over there
    backoff_limit: int = 20  # pod restarts a stage may use (each preemption's resume is one)

    def job(self, stage: str) -> ClusterJobConfig:
        """Stage `stage`'s resources: its overrides over the defaults."""
        own = self.stages.get(stage, ClusterJobConfig())
        return ClusterJobConfig(
            **{
                f.name: getattr(own, f.name) if getattr(own, f.name) is not None else getattr(self, f.name)
                for f in dataclasses.fields(ClusterJobConfig)
            }
        )


@dataclass
class ExperimentConfig:
    """A whole experiment: shared settings and the ordered stages."""

    name: str
    stages: list[StageConfig]
    datasets: dict[str, DatasetConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: str | None = None  # everything of the run goes here; default runs/<name>
    seed: int = 0
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), gpus: int | Literal["cluster"] | None = None
) -> ExperimentConfig:
    """Read YAML, apply `key.sub=value` overrides, build the typed config, size its ranks and validate it.

    `gpus` is what the stages will run on, per node: None for this machine's visible CUDA devices, "cluster" for
    `cluster.gpus_per_node` (`mixer submit`), or a count."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        apply_override(raw, item, path)
    cfg = _build(ExperimentConfig, raw, "", path)
    resolve_ranks(cfg, gpus, path)
    validate(cfg, path)
    return cfg


def resolve_ranks(cfg: ExperimentConfig, gpus: int | Literal["cluster"] | None, source: Path) -> None:
    """Set `launch.nproc_per_node` from "auto", or refuse a number the node cannot run (see LaunchConfig)."""
    launch, cluster = cfg.launch, cfg.cluster
    asked = launch.nproc_per_node
    if asked != "auto":
        if asked < 1:
            raise ConfigError(f"{source}: 'launch.nproc_per_node' must be >= 1 or auto")
        for stage in [None, *cfg.stages]:
            job_gpus = cluster.job(stage.name).gpus_per_node if stage else cluster.gpus_per_node
            where = f"cluster.stages.{stage.name}.gpus_per_node" if stage else "cluster.gpus_per_node"
            if job_gpus and job_gpus != asked:
                raise ConfigError(
                    f"{source}: 'launch.nproc_per_node' is {asked} but '{where}' is {job_gpus}: one rank per GPU, so "
                    f"set launch.nproc_per_node={job_gpus} (or auto)"
                )
    if gpus == "cluster":
        count, machine = cluster.gpus_per_node, "each cluster node (cluster.gpus_per_node)"
    elif launch.device == "cpu":
        count, machine = 0, "this machine"
    elif gpus is None:
        from pipeline import dist  # the CUDA driver's count; only when loading for this machine

        count, machine = dist.visible_gpus(launch.device), "this machine"
    else:
        count, machine = gpus, "this machine"
    if launch.device == "cuda" and not count:
        raise ConfigError(f"{source}: 'launch.device' is cuda but {machine} has no visible CUDA device")
    if asked == "auto":
        launch.nproc_per_node = count or CPU_RANKS
    elif count and asked > count:
        raise ConfigError(
            f"{source}: 'launch.nproc_per_node' is {asked} but {machine} has {count} GPU{'s' if count > 1 else ''}: "
            f"set launch.nproc_per_node={count} (or auto, one rank per GPU), or launch.device=cpu for CPU ranks"
        )


def apply_override(raw: dict, item: str, source: Path | str = "<overrides>") -> None:
    """Set a dotted key (`stages.pretrain.steps=10`; a stage is named by its `name` or its index)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    value = yaml.safe_load(text)
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where, source)
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{source}: override {key!r}: {where} is not a section")
    if isinstance(node, list):
        raise ConfigError(f"{source}: override {key!r} must name a key inside a list item")
    node[parts[-1]] = value


def _list_item(items: list, part: str, where: str, source: Path | str) -> Any:
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    raise ConfigError(f"{source}: override names {where!r}, but there is no such list item")


def _build(cls: type, data: Any, where: str, source: Path) -> Any:
    """Construct dataclass `cls` from `data`, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {_join(where, key)!r}{hint}")
    if cls is StageConfig and isinstance(data.get("kind"), str):
        # The optimiser's defaults depend on the stage kind: merge the user's keys over them.
        defaults = dataclasses.asdict(OptimConfig.for_kind(data["kind"]))
        data = {**data, "optim": {**defaults, **(data.get("optim") or {})}}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], _join(where, f.name), source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {_join(where, f.name)!r}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str, source: Path) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, where, source)
        for inner in options:  # int | Literal["auto"]: the first that takes the value
            try:
                return _convert(inner, value, where, source)
            except ConfigError:
                continue
        expected = " or ".join(_describe(a) for a in options)
        raise ConfigError(f"{source}: {where!r} must be {expected}, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [member.value for member in tp]
        if value not in allowed:
            raise ConfigError(f"{source}: {where!r} is {value!r}; expected one of {allowed}")
        return tp(value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {where!r} is {value!r}; expected one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(where, "a list", value, source)
        return [_convert(args[0], v, f"{where}[{_item_name(v, i)}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(where, "a mapping", value, source)
        return {str(k): _convert(args[1], v, _join(where, k), source) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _type_error(where, f"a list of {len(args)} numbers", value, source)
        return tuple(_convert(a, v, where, source) for a, v in zip(args, value, strict=True))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise _type_error(where, tp.__name__, value, source)
    return value


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _type_error(where: str, expected: str, value: Any, source: Path) -> ConfigError:
    return ConfigError(f"{source}: {where!r} must be {expected}, got {value!r} ({type(value).__name__})")


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _item_name(value: Any, index: int) -> str:
    return str(value["name"]) if isinstance(value, dict) and "name" in value else str(index)


# --------------------------------------------------------------------------- validation


def _choice(value: Any, allowed: tuple, where: str, source: Path) -> None:
    if value not in allowed:
        raise ConfigError(f"{source}: {where!r} is {value!r}; expected one of {list(allowed)}")


def validate(cfg: ExperimentConfig, source: Path | str = "<config>") -> None:
    """Cross-field checks that types alone cannot express."""
    source = Path(source)
    for where, name in [("name", cfg.name), *((f"stages[{i}].name", s.name) for i, s in enumerate(cfg.stages))]:
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(
                f"{source}: '{where}' is {name!r}: use letters, digits, '_', '.' and '-' (starting with a letter or "
                "digit)"
            )
    if cfg.model.variant is not None:
        _choice(cfg.model.variant, tuple(VARIANTS), "model.variant", source)
    else:
        for name in ("patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim"):
            if getattr(cfg.model, name) is None:
                raise ConfigError(f"{source}: 'model.{name}' is required when model.variant is not set")
    _choice(cfg.model.gelu, ("exact", "tanh"), "model.gelu", source)
    _choice(cfg.model.remat, REMAT, "model.remat", source)
    if cfg.model.fused_gelu and cfg.model.gelu != "tanh":
        raise ConfigError(f"{source}: 'model.fused_gelu' needs model.gelu: tanh (cuBLASLt's GELU is the tanh one)")
    try:
        cfg.model.spec().validate()
    except ValueError as err:
        raise ConfigError(f"{source}: model: {err}") from err
    _choice(cfg.deepspeed.zero_stage, (0, 1, 2, 3), "deepspeed.zero_stage", source)
    _choice(cfg.deepspeed.precision, ("auto", "bf16", "fp32", "autocast"), "deepspeed.precision", source)
    _choice(cfg.deepspeed.compile_mode, COMPILE_MODES, "deepspeed.compile_mode", source)
    _choice(cfg.deepspeed.fp8, FP8_RECIPES, "deepspeed.fp8", source)
    if cfg.model.stacked and cfg.deepspeed.fp8 != "none":
        raise ConfigError(f"{source}: 'model.stacked' cannot be combined with deepspeed.fp8 (per-block Linear modules)")
    _choice(cfg.launch.device, ("auto", "cuda", "cpu"), "launch.device", source)
    if cfg.launch.nnodes < 1:
        raise ConfigError(f"{source}: 'launch.nnodes' must be >= 1")
    if cfg.launch.nnodes > 1 and not cfg.launch.rdzv_endpoint:
        raise ConfigError(f"{source}: 'launch.rdzv_endpoint' is required when launch.nnodes > 1")
    for name, ds in cfg.datasets.items():
        if ds.num_classes < 1:
            raise ConfigError(f"{source}: 'datasets.{name}.num_classes' must be >= 1")
        if ds.generate is not None:
            _choice(ds.generate.kind, ("shapes", "novel-shapes", "photos"), f"datasets.{name}.generate.kind", source)
        for i, src in enumerate(ds.sources):
            if not src.weight > 0:
                raise ConfigError(f"{source}: 'datasets.{name}.sources[{i}].weight' must be > 0")
    _choice(cfg.data.mode, ("split", "resampled"), "data.mode", source)
    _choice(cfg.data.decode, ("cpu", "gpu"), "data.decode", source)
    if cfg.data.num_workers < 0 or cfg.data.shuffle_buffer < 1 or cfg.data.open_retries < 0:
        raise ConfigError(f"{source}: data.num_workers and data.open_retries must be >= 0, data.shuffle_buffer >= 1")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"{source}: 'data.max_bad_fraction' must be between 0 and 1")
    if not cfg.stages:
        raise ConfigError(f"{source}: 'stages' is empty")
    for name in cfg.cluster.stages:
        if name not in [s.name for s in cfg.stages]:
            raise ConfigError(
                f"{source}: 'cluster.stages.{name}' names no stage; stages: {[s.name for s in cfg.stages]}"
            )
    for key in cfg.cluster.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{source}: 'cluster.env' key {key!r} is not an environment variable name")
    if cfg.cluster.nodes < 1 or cfg.cluster.gpus_per_node < 0:
        raise ConfigError(f"{source}: 'cluster.nodes' must be >= 1 and 'cluster.gpus_per_node' >= 0")
    seen: list[str] = []
    for stage in cfg.stages:
        where = f"stages[{stage.name}]"
        if stage.name in seen:
            raise ConfigError(f"{source}: two stages are named {stage.name!r}")
        if stage.dataset not in cfg.datasets:
            raise ConfigError(f"{source}: '{where}.dataset' is {stage.dataset!r}; datasets: {list(cfg.datasets)}")
        init = stage.init_from
        if init is not None and init not in seen and not init.endswith(WEIGHT_SUFFIXES):
            raise ConfigError(
                f"{source}: '{where}.init_from' is {init!r}: name an earlier stage ({seen}) or a weights file "
                f"({', '.join(WEIGHT_SUFFIXES)})"
            )
        if not stage.kind.trains:
            if stage.init_from is None:
                raise ConfigError(f"{source}: '{where}.init_from' is required for an eval stage")
        elif stage.steps < 1:
            raise ConfigError(f"{source}: '{where}.steps' must be >= 1 for a {stage.kind} stage")
        for key in ("micro_batch", "grad_accum", "global_batch", "image_size", "eval_batch", "log_every"):
            if getattr(stage, key) is not None and getattr(stage, key) < 1:
                raise ConfigError(f"{source}: '{where}.{key}' must be >= 1")
        if stage.checkpoint_keep < 0 or stage.checkpoint_every_minutes < 0:
            raise ConfigError(f"{source}: '{where}.checkpoint_keep' and checkpoint_every_minutes must be >= 0")
        if stage.resume_from is not None and not stage.kind.trains:
            raise ConfigError(f"{source}: '{where}.resume_from' belongs to a training stage")
        if stage.grad_accum is not None and stage.global_batch is not None:
            raise ConfigError(f"{source}: '{where}': set grad_accum or global_batch, not both")
        try:
            stage.accumulation(cfg.launch.nproc_per_node * cfg.launch.nnodes)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from err
        if stage.fewshot is not None:
            if stage.kind.trains:
                raise ConfigError(f"{source}: '{where}.fewshot' belongs to an eval stage")
            name = stage.fewshot.dataset or stage.dataset
            if name not in cfg.datasets:
                raise ConfigError(f"{source}: '{where}.fewshot.dataset' is {name!r}; datasets: {list(cfg.datasets)}")
        if stage.zero_stage is not None:
            _choice(stage.zero_stage, (0, 1, 2, 3), f"{where}.zero_stage", source)
        zero = cfg.deepspeed.zero_stage if stage.zero_stage is None else stage.zero_stage
        compiled_zero3 = cfg.deepspeed.compile and zero == 3 and stage.kind.trains
        if compiled_zero3 and (cfg.deepspeed.compile_mode != "default" or cfg.deepspeed.fp8 != "none"):
            raise ConfigError(
                f"{source}: {where} runs ZeRO-3 with deepspeed.compile, which compiles through DeepSpeed's"
                " DeepCompile: 'deepspeed.compile_mode' must be default and 'deepspeed.fp8' none"
            )
        _check_ranges(stage, where, source)
        if stage.image_size is not None and stage.image_size % cfg.model.spec().patch_size:
            raise ConfigError(
                f"{source}: '{where}.image_size' is {stage.image_size}, not a multiple of the patch size "
                f"{cfg.model.spec().patch_size}"
            )
        _choice(stage.optim.name, ("adamw", "sgd"), f"{where}.optim.name", source)
        _choice(stage.optim.schedule, ("linear", "cosine"), f"{where}.optim.schedule", source)
        _choice(stage.augment.crop, ("inception", "resize"), f"{where}.augment.crop", source)
        _choice(stage.augment.eval_crop, ("resize-crop", "resmall-crop"), f"{where}.augment.eval_crop", source)
        for crop in stage.augment.extra_eval_crops:
            _choice(crop, ("resize-crop", "resmall-crop"), f"{where}.augment.extra_eval_crops", source)
        seen.append(stage.name)


# Each numeric stage setting's allowed range: key, lowest, highest (None: no bound), and whether each bound itself
# is allowed.
STAGE_RANGES = (
    ("steps", 0, None, True, True),
    ("eval_every", 0, None, True, True),
    ("checkpoint_every", 0, None, True, True),
    ("stoch_depth", 0, 1, True, False),  # 1 would drop every block
    ("dropout", 0, 1, True, False),
    ("optim.lr", 0, None, False, True),
    ("optim.weight_decay", 0, None, True, True),
    ("optim.momentum", 0, 1, True, False),
    ("optim.warmup_steps", 0, None, True, True),
    ("optim.grad_clip", 0, None, True, True),
    ("augment.randaugment_magnitude", 0, 30, True, True),  # torchvision's RandAugment has 31 magnitude bins
    ("augment.mixup", 0, None, True, True),
    ("augment.cutmix", 0, None, True, True),
    ("augment.eval_resize", 0, None, False, True),
)


def _check_ranges(stage: StageConfig, where: str, source: Path) -> None:
    """Numbers a stage would only reject inside its ranks (DeepSpeed's, torch's or our own errors) or accept and
    train wrongly with: refused here, naming the key (nan too)."""
    for key, low, high, low_ok, high_ok in STAGE_RANGES:
        value: Any = stage
        for part in key.split("."):
            value = getattr(value, part)
        above = value >= low if low_ok else value > low
        below = high is None or (value <= high if high_ok else value < high)
        if not (above and below):
            bound = f"{'>=' if low_ok else '>'} {low}" + (f" and {'<=' if high_ok else '<'} {high}" if high else "")
            raise ConfigError(f"{source}: '{where}.{key}' is {value}; it must be {bound}")
    low, high = stage.augment.crop_scale
    if not 0 < low <= high <= 1:
        raise ConfigError(f"{source}: '{where}.augment.crop_scale' is [{low}, {high}]; it must be 0 < low <= high <= 1")
    for i, beta in enumerate(stage.optim.betas):
        if not 0 <= beta < 1:
            raise ConfigError(f"{source}: '{where}.optim.betas[{i}]' is {beta}; it must be >= 0 and < 1")


# --------------------------------------------------------------------------- dumping


def to_dict(cfg: Any) -> dict:
    """Plain YAML-safe data (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(cfg: ExperimentConfig, path: str | Path, header: str = "") -> None:
    """The resolved config as YAML, under `header` as comment lines (the source file's, see `read_header`)."""
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    Path(path).write_text(comments + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_header(path: str | Path) -> str:
    """A config file's opening comment block without the `#`s: its command, hardware and expected result
    (the parent run's description in MLflow)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines).strip("\n")


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; stages are keyed by name. For MLflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            for item in value:
                out.update(flatten(item, f"{name}.{item['name']}."))
        else:
            out[name] = value
    return out


def stage_params(cfg: ExperimentConfig, stage: StageConfig) -> dict[str, Any]:
    """The flattened resolved config as one stage sees it: the shared sections plus its own settings (its MLflow
    params, and the settings its checkpoints record)."""
    data = to_dict(cfg)
    data.pop("stages")
    data["stage"] = to_dict(stage)
    return flatten(data)
