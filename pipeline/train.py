"""One stage on every rank: build -> (resume | init) -> train / evaluate -> save -> export -> report."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import checkpoint, dist, tracking
from pipeline import engine as eng
from pipeline.config import ConfigError, ExperimentConfig, FewShotConfig, StageConfig, flatten, to_dict
from pipeline.data.gpu import Prefetched, gpu_stream
from pipeline.data.shards import ShardIndex, read_index
from pipeline.data.sources import training_sources
from pipeline.data.stream import TrainStream, cpu_prepare, eval_batches, seed_of, stream_plan
from pipeline.data.transforms import batch_transform, eval_transform, normalize, stack_images, train_transform
from pipeline.fewshot import fewshot_accuracy
from pipeline.flops import peak_flops, train_flops_per_image
from pipeline.layout import RunLayout, StageLayout
from pipeline.models.mixer import MixerSpec, MlpMixer

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """This process's random generators (python, numpy, torch CPU and CUDA) as JSON, for its checkpoint."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    """The inverse of `rng_states` (CUDA generators only where this process has as many devices)."""
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(states["torch"]))
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in states["cuda"]])


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def stage_params(cfg: ExperimentConfig, stage: StageConfig) -> dict:
    """The flattened resolved config as this stage sees it: shared sections plus its own settings."""
    data = to_dict(cfg)
    data.pop("stages")
    data["stage"] = to_dict(stage)
    return flatten(data)


def stage_fingerprint(cfg: ExperimentConfig, stage: StageConfig, spec: MixerSpec) -> dict:
    """What a checkpoint must share with the config that loads it. The data set is known by its shards' counts,
    not its location: copying shards to another disk is harmless."""
    dataset = cfg.datasets[stage.dataset]
    sources = training_sources(dataset, RunLayout(Path(cfg.output_dir)).data_index)
    return {
        "model": dataclasses.asdict(spec),
        "gelu": cfg.model.gelu,
        "num_classes": dataset.num_classes,
        "dataset": [[len(s.urls), s.num_samples, s.weight] for s in sources],
        "zero_stage": eng.zero_stage_of(stage, cfg.deepspeed),
        "stacked": cfg.model.stacked,  # the order of the parameters in ZeRO's flat partitions
    }


def run_stage(cfg: ExperimentConfig, stage_name: str, parent_run_id: str | None) -> dict:
    """Run one stage in this process (one rank of the launcher's job); returns the stage's result."""
    # DeepSpeed's ZeRO calls a collective that torch has renamed; the notice means nothing to a user.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    stage = cfg.stage(stage_name)
    env = dist.read_env(cfg.launch.device)
    dist.init_process_group(env)
    layout = RunLayout(Path(cfg.output_dir)).stage(stage.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    dataset = cfg.datasets[stage.dataset]
    spec = checkpoint.stage_specs(cfg, upto=stage.name)[stage.name]

    # Identical initial weights on every rank; rank-specific randomness (dropout, data) after.
    seed_everything(cfg.seed)
    model = MlpMixer(
        spec,
        dataset.num_classes,
        stoch_depth=stage.stoch_depth,
        dropout=stage.dropout,
        gelu=cfg.model.gelu,
        stacked=cfg.model.stacked,
        remat=cfg.model.remat,
        fused_gelu=cfg.model.fused_gelu,
    )
    seed_everything(cfg.seed + 1000 * (env.rank + 1))

    # Resume precedence (see pipeline.checkpoint):
    # 1. the stage's own latest complete checkpoint, 2. resume_from (full state), 3. init_from (weights only),
    # 4. scratch.
    # Each checkpoint is verified (checksums, and pickles holding only what DeepSpeed's do) before it is chosen.
    resume_at: tuple[Path, str] | None = None
    if stage.kind != "eval":
        own, passed_over = checkpoint.newest_verified(layout.checkpoints, env.rank, env.world_size)
        if own is not None:
            resume_at = (layout.checkpoints, own)
            if passed_over and env.is_primary:
                log.warning("stage %s resumes from %s, not a newer one: %s", stage.name, own, "; ".join(passed_over))
        elif stage.resume_from is not None:
            resume_at = checkpoint.resume_source(stage.resume_from)
            checkpoint.verify(*resume_at, env.rank, env.world_size)
    if resume_at is None and stage.init_from is not None:
        source = checkpoint.init_source(stage.init_from, RunLayout(Path(cfg.output_dir)))
        checkpoint.init_weights(model, source, new_head=stage.kind == "finetune")
    # Another number of ranks than the checkpoint's: load its universal conversion (refused where inexact).
    zero = eng.zero_stage_of(stage, cfg.deepspeed)
    reshard = False
    if resume_at is not None:
        saved_ranks = checkpoint.saved_world_size(*resume_at)
        checkpoint.check_reshardable(saved_ranks, env.world_size, stage.optim.name, zero)
        reshard = saved_ranks != env.world_size
    ds_config = eng.build_config(stage, cfg.deepspeed, env.world_size, env.device, load_universal=reshard)
    if env.is_primary:
        layout.deepspeed_config.write_text(json.dumps(ds_config, indent=2))
    compile_mode = cfg.deepspeed.compile_mode if cfg.deepspeed.compile else None
    engine = eng.build_engine(model, stage, ds_config, compile_mode, cfg.deepspeed.fp8)
    start_step, data_state, changes = 0, None, []
    fingerprint = stage_fingerprint(cfg, stage, spec) if stage.kind != "eval" else {}
    if resume_at is not None:
        state = checkpoint.resume(engine, *resume_at, fingerprint, env.rank, env.world_size, reshard)
        changes = checkpoint.changed_settings(state.get("settings", {}), stage_params(cfg, stage))
        start_step = int(state["step"])
        data_state = checkpoint.data_state(*resume_at, env.rank)
        saved_rng = checkpoint.rng_state(*resume_at, env.rank)
        if saved_rng is not None:  # the loop reseeds every step from (seed, step) too, so this is belt and braces
            set_rng_states(saved_rng)

    tracker = tracking.start_stage(cfg, stage.name, stage.kind, layout.run_id, parent_run_id, env.is_primary)
    if resume_at is not None:
        # Harmless changes (more steps, another eval interval, ...) are allowed; the run records them.
        tags = {"resumed_from": str(resume_at[0] / resume_at[1]), "resume_changes": ", ".join(changes)}
        if reshard:
            tags["resumed_world_size"] = f"{saved_ranks} -> {env.world_size} ranks (universal checkpoint)"
        tracker.set_tags(tags)
    # Where and how this attempt ran (a requeued job may land elsewhere): the world and the communication settings.
    launched = {"launch/world_size": str(env.world_size), "launch/device": str(env.device.type)}
    launched |= {f"env/{k}": v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL_"))}
    tracker.set_tags(launched)
    if not tracker.resumed:
        tracker.log_params(stage_params(cfg, stage))
        tracker.log_artifact(Path(cfg.output_dir) / "config.yaml")
        tracker.log_artifact(layout.deepspeed_config)
    started = time.time()
    try:
        runner = StageRunner(cfg, stage, env, engine, tracker, layout, spec, fingerprint)
        metrics = runner.evaluate() if stage.kind == "eval" else runner.train(start_step, data_state)
        result = {
            "stage": stage.name,
            "kind": stage.kind,
            "steps": stage.steps,
            "wall_s": round(time.time() - started, 1),
            "world_size": env.world_size,
            **metrics,
            "run_id": tracker.run_id,
        }
        if stage.kind != "eval":
            tag = runner.final_tag
            result["checkpoint"] = str(layout.checkpoints / tag)
            if env.is_primary:
                weights = checkpoint.export(engine, layout, tag, spec, dataset.num_classes, zero, cfg.model.gelu)
                result["weights"] = str(weights)
                if cfg.tracking.log_model:
                    registered = cfg.tracking.experiment or cfg.name
                    tracker.log_model([weights, layout.model_config], registered, {"stage": stage.name})
                else:
                    tracker.log_artifact(layout.model_config)
        if env.is_primary:
            layout.write_result(result)
        dist.barrier()
    except Preempted as stop:
        # The stage's MLflow run continues when the same command is run again (tracking keeps its id). The
        # checkpoint is complete; the marker goes first, and the tracker gets what is left of the ~30 s that
        # schedulers (Slurm's KillWait, torchrun's shutdown) allow after SIGTERM before they kill.
        if env.is_primary:
            layout.preempted.write_text(str(stop.step))
        tracker.set_tags({"preempted_at_step": str(stop.step)})
        tracker.finish("KILLED", timeout_s=min(cfg.tracking.flush_timeout_s, PREEMPTED_FLUSH_S))
        dist.barrier()
        dist.destroy()
        raise
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    dist.destroy()
    return result


# Seconds a preempted stage waits for its pending MLflow calls before it exits for the requeue.
PREEMPTED_FLUSH_S = 15.0


class Preempted(Exception):
    """The scheduler asked the job to stop; a checkpoint of the current step is saved."""

    def __init__(self, stage: str, step: int) -> None:
        super().__init__(f"stage {stage!r} preempted at step {step}; its checkpoint is saved")
        self.step = step


class Preemption:
    """SIGTERM (preemption, time limit) and SIGUSR1 (Slurm's --signal warning) ask every rank to finish the step it
    is in, save, and exit with REQUEUE_EXIT. Ranks may get the signal at different steps, so they agree on it
    through one all-reduce per step.

    `catch()` turns the signals into that request for the whole life of a rank, from before its set-up: one signalled
    while it builds its engine stops at its first step, and one that is failing is not killed halfway through its
    failure handling (torchrun sends SIGTERM to every other rank as soon as one fails)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    requested = False  # since `catch()`, in this process

    @classmethod
    def catch(cls) -> None:
        for sig in cls.SIGNALS:
            signal.signal(sig, cls._request)

    @classmethod
    def _request(cls, signum: int, frame: object) -> None:
        cls.requested = True

    def __init__(self) -> None:
        self.catch()  # already done where `mixer stage` started the rank; a rank started otherwise starts here

    def agreed(self, save_due: bool = False) -> tuple[bool, bool]:
        """(stop requested on any rank, a time-based save due on any rank), in one collective."""
        stop, due = dist.all_reduce_max([float(self.requested), float(save_due)])
        return stop > 0, due > 0


class StageRunner:
    """The loop of one stage on one rank."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        stage: StageConfig,
        env: dist.DistEnv,
        engine: eng.Engine,
        tracker: tracking.NullTracker,
        layout: StageLayout,
        spec: MixerSpec,
        fingerprint: dict,
    ) -> None:
        self.cfg, self.stage, self.env, self.engine, self.tracker = cfg, stage, env, engine, tracker
        self.layout, self.fingerprint = layout, fingerprint
        self.last_save = time.time()
        self.final_tag: str | None = None  # the stage's last checkpoint, once `train` has saved or found it
        self.dataset = cfg.datasets[stage.dataset]
        self.spec = spec
        self.image_size = spec.image_size
        self.preemption = Preemption()
        self.dtype = torch.bfloat16 if eng.uses_bf16(cfg.deepspeed, env.device) else torch.float32
        self.stream: TrainStream | Prefetched | None = None
        self.metrics: dict[str, float] = {}
        self.bad_log: list[dict] = []
        self.bad_logged_at, self.bad_unlogged = 0.0, False
        self.saver = checkpoint.Saver(
            engine,
            layout.checkpoints,
            rank=env.rank,
            world_size=env.world_size,
            keep=stage.checkpoint_keep,
            background=stage.checkpoint_async and stage.kind != "eval",
        )

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch -> standardised float32 on the device (mixup and the model's dtype come after)."""
        device = self.env.device
        return normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)

    def save(self, step: int, wait: bool = False) -> str:
        """Collective checkpoint of the engine and this rank's data position. `checkpoint/save_s` is the time the
        loop was held up (with `checkpoint_async`, the copy to host memory); `wait`: until it is complete."""
        started = time.time()
        state = self.stream.state() if self.stream is not None else None
        client = {
            "mlflow_run_id": self.tracker.run_id,
            "fingerprint": self.fingerprint,
            "settings": stage_params(self.cfg, self.stage),
        }
        tag = self.saver.save(step, client, state, rng_states())
        if wait:
            self.saver.wait()
        self.last_save = time.time()
        self.tracker.log_metrics({"checkpoint/save_s": self.last_save - started}, step)
        return tag

    def _train_stream(self, data_state: dict | None) -> TrainStream | Prefetched:
        stage, env, data = self.stage, self.env, self.cfg.data
        sources = training_sources(self.dataset, RunLayout(Path(self.cfg.output_dir)).data_index)
        plan = stream_plan(self.cfg, stage, env.rank, env.world_size, sources)
        if data.decode == "gpu":
            if env.device.type != "cuda":
                raise ConfigError("data.decode=gpu needs a CUDA device; use data.decode=cpu here")
            return gpu_stream(
                plan,
                stage.augment,
                self.image_size,
                env.device,
                state=data_state,
                max_bad_fraction=data.max_bad_fraction,
            )
        prepare = cpu_prepare(train_transform(stage.augment, self.image_size))
        return TrainStream(
            plan, prepare, collate=stack_images, state=data_state, max_bad_fraction=data.max_bad_fraction
        )

    def _report_bad_data(self, final: bool) -> dict:
        """Bad samples of all ranks: counts as metrics; shard URL + key of each to `data/bad_samples.jsonl`
        (rewritten at most once a minute)."""
        stream = self.stream
        events = list(stream.new_bad)
        stream.new_bad.clear()
        bad, read = dist.all_reduce_sum([stream.bad, stream.read])
        gathered = [e for part in dist.all_gather_objects(events) for e in part]
        self.bad_log.extend(gathered)
        del self.bad_log[: max(0, len(self.bad_log) - 10_000)]
        self.bad_unlogged |= bool(gathered)
        if self.bad_unlogged and (final or time.time() - self.bad_logged_at > 60):
            self.tracker.log_text("\n".join(json.dumps(e) for e in self.bad_log), "data/bad_samples.jsonl")
            self.bad_logged_at, self.bad_unlogged = time.time(), False
        return {"data/bad_samples": bad, "data/bad_fraction": bad / max(read, 1)}

    def train(self, start_step: int, data_state: dict | None) -> dict:
        """The remaining steps, the final checkpoint (`final_tag`), then the final evaluation: saved first, so that
        a failing evaluation loses no training and a rerun only evaluates again."""
        self.stream = self._train_stream(data_state)
        try:
            self._train_steps(start_step)
        finally:
            # Loader workers ignore SIGTERM (see stream); they must be stopped here, or exit would wait on them.
            self.stream.close()
        end = checkpoint.tag_for(self.stage.steps)
        resumed_at_end = start_step == self.stage.steps and end in checkpoint.complete_tags(self.layout.checkpoints)
        self.final_tag = end if resumed_at_end else self.save(self.stage.steps, wait=True)  # the export reads it
        dist.barrier()
        return {**self.metrics, **self.evaluate(self.stage.steps)}

    def _train_steps(self, start_step: int) -> None:
        stage, env = self.stage, self.env
        batches = self.stream
        step_seed = seed_of(self.cfg.seed, zlib.crc32(stage.name.encode()), env.rank)
        mix = batch_transform(stage.augment, self.dataset.num_classes)
        flops_per_image = train_flops_per_image(self.spec, self.dataset.num_classes)
        peak, estimated = peak_flops(env.device, eng.matmul_dtype(self.cfg.deepspeed, env.device))
        # Tags, not params: a resumed run may measure a slightly different estimate, and params never change.
        self.tracker.set_tags(
            {
                "mfu/peak_tflops": f"{peak / 1e12:.2f}",
                "mfu/peak_source": "estimated (measured matmul)" if estimated else "datasheet",
            }
        )
        accumulation = stage.accumulation(env.world_size)
        images_per_step = stage.micro_batch * accumulation * env.world_size
        # A live line on a terminal; in a log file (batch jobs, CI) a line every 20 s is enough.
        bar = tqdm(
            total=stage.steps,
            initial=start_step,
            desc=stage.name,
            unit="step",
            dynamic_ncols=True,
            disable=not env.is_primary,
            mininterval=0.2 if sys.stderr.isatty() else 20,
        )
        metrics: dict[str, float] = {}
        loss_sum = torch.zeros((), device=env.device)
        window_start, window_steps = time.time(), 0
        for step in range(start_step + 1, stage.steps + 1):
            # Mixup, stochastic depth and dropout draw from a generator seeded per step: a resumed run replays them.
            torch.manual_seed(seed_of(step_seed, step))
            for _ in range(accumulation):
                images, labels = next(batches)
                images, labels = self._to_device(images, labels)
                if mix is not None:
                    images, labels = mix(images, labels)  # labels: (B, classes) probabilities
                loss = F.cross_entropy(self.engine(images.to(self.dtype)).float(), labels)
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += loss.detach()
            window_steps += 1
            bar.update(1)
            if step % stage.log_every == 0 or step == stage.steps:
                total, count = dist.all_reduce_sum([loss_sum.item(), window_steps * accumulation])
                mean_loss = total / count
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"stage {stage.name}: loss is {mean_loss} at step {step}")
                elapsed = time.time() - window_start
                img_per_s = window_steps * images_per_step / elapsed
                if env.device.type == "cuda":  # the fullest card decides what fits
                    gib = dist.all_reduce_max([torch.cuda.max_memory_allocated(env.device) / 2**30])
                    metrics_extra = {"train/peak_mem_gib": gib[0]}
                else:
                    metrics_extra = {}
                self.metrics = metrics = {
                    **metrics_extra,
                    **self._report_bad_data(final=step == stage.steps),
                    "train/loss": mean_loss,
                    "train/lr": self.engine.get_lr()[0],
                    "train/epoch": self.stream.epoch + self.stream.position / self.stream.plan.batches_per_epoch,
                    "train/img_per_s": img_per_s,
                    "train/mfu": img_per_s * flops_per_image / (peak * env.world_size),
                    "train/skipped_steps": eng.skipped_steps(self.engine),  # inf/nan gradients: step not applied
                }
                self.tracker.log_metrics(metrics, step)
                shown = {"loss": f"{mean_loss:.4f}", "lr": f"{metrics['train/lr']:.2e}", "img_s": f"{img_per_s:.0f}"}
                if metrics["data/bad_samples"]:
                    shown["skipped"] = f"{metrics['data/bad_samples']:.0f} bad"
                bar.set_postfix(shown)
                loss_sum.zero_()
                window_start, window_steps = time.time(), 0
            if stage.eval_every and step % stage.eval_every == 0 and step != stage.steps:
                self.evaluate(step)
                window_start = time.time()
            minutes = stage.checkpoint_every_minutes
            late = minutes > 0 and time.time() - self.last_save > 60 * minutes
            stop, late = self.preemption.agreed(late)  # ranks' clocks differ: agree on both
            scheduled = late or (stage.checkpoint_every and step % stage.checkpoint_every == 0)
            if step != stage.steps and (scheduled or stop):  # a stop saves too, once, and waits for it
                self.save(step, wait=stop)
                window_start = time.time()
            if stop and step != stage.steps:
                bar.close()
                raise Preempted(stage.name, step)
        bar.close()

    def _held_out(
        self, index: ShardIndex, crop: str | None = None, num_classes: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sample of `index` once over all ranks, preprocessed for evaluation; equal batches per rank. With
        `num_classes`, a sample labelled outside it is skipped with a warning naming it."""
        augment = self.stage.augment if crop is None else dataclasses.replace(self.stage.augment, eval_crop=crop)
        batches = eval_batches(
            index,
            rank=self.env.rank,
            world_size=self.env.world_size,
            batch_size=self.stage.eval_batch,
            transform=eval_transform(augment, self.image_size),
            image_size=self.image_size,
            num_workers=self.cfg.data.num_workers,
            num_classes=num_classes,
        )
        for images, labels in batches:
            images, labels = self._to_device(images, labels)
            yield images.to(self.dtype), labels

    @torch.no_grad()
    def evaluate(self, step: int = 0) -> dict:
        """Top-1, top-5 and loss on the held-out split (`eval/...`, and `eval/<crop>/...` for each extra crop),
        summed over ranks; few-shot accuracy if configured."""
        index = read_index(Path(self.dataset.path) / self.dataset.eval_split)
        self.engine.eval()
        metrics = self._classify(index, None, "eval")
        for crop in self.stage.augment.extra_eval_crops:
            metrics.update(self._classify(index, crop, f"eval/{crop}"))
        if self.stage.fewshot is not None:
            metrics.update(self._fewshot(self.stage.fewshot))
        self.engine.train()
        self.tracker.log_metrics(metrics, step)
        return metrics

    def _classify(self, index: ShardIndex, crop: str | None, prefix: str) -> dict:
        correct1 = correct5 = loss_sum = seen = 0.0
        for images, labels in self._held_out(index, crop, self.dataset.num_classes):
            logits = self.engine(images).float()
            valid = labels >= 0  # padding batches are labelled -1
            logits, labels = logits[valid], labels[valid]
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, k)
            correct1 += (top[:, 0] == labels).sum().item()
            correct5 += (top == labels[:, None]).any(dim=-1).sum().item()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            seen += labels.numel()
        correct1, correct5, loss_sum, seen = dist.all_reduce_sum([correct1, correct5, loss_sum, seen])
        if seen == 0:
            raise RuntimeError(f"no readable samples in {index.root}")
        return {
            f"{prefix}/top1": correct1 / seen,
            f"{prefix}/top5": correct5 / seen,
            f"{prefix}/loss": loss_sum / seen,
            f"{prefix}/samples": seen,
        }

    def _features(self, index: ShardIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen pre-logit features (N, C) and labels of every sample of `index`, gathered from all ranks."""
        features, labels = [], []
        for images, y in self._held_out(index):
            valid = y >= 0
            features.append(self.engine.module.features(images)[valid].float().cpu())
            labels.append(y[valid].cpu())
        local = (torch.cat(features), torch.cat(labels))
        return tuple(torch.cat(parts) for parts in zip(*dist.all_gather_objects(local)))

    def _fewshot(self, fs: FewShotConfig) -> dict:
        """big_vision's linear few-shot protocol; each value is the mean over `fs.seeds` draws of the shots."""
        name = fs.dataset or self.stage.dataset
        dataset = self.cfg.datasets[name]
        pool = read_index(Path(dataset.path) / dataset.train_split).head(fs.max_train_samples)
        train_x, train_y = self._features(pool)
        test_x, test_y = self._features(read_index(Path(dataset.path) / dataset.eval_split))
        return {
            f"fewshot/{name}/{k}shot": sum(
                fewshot_accuracy(train_x, train_y, test_x, test_y, dataset.num_classes, k, fs.l2, seed)
                for seed in range(fs.seeds)
            )
            / fs.seeds
            for k in fs.shots
        }
