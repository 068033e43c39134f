"""One stage on every rank: build -> plan the resume -> engine -> restore -> train or evaluate -> save -> export."""

from __future__ import annotations

import json
import os
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import checkpoint, dist, tracking
from pipeline import engine as eng
from pipeline.config import ConfigError, ExperimentConfig, StageConfig, stage_params
from pipeline.data.gpu import gpu_stream
from pipeline.data.index import ShardIndex
from pipeline.data.sources import training_sources
from pipeline.data.stream import Stream, TrainStream, cpu_prepare, seed_of, stream_plan
from pipeline.data.transforms import batch_transform, stack_images, to_device, train_transform
from pipeline.evaluate import Evaluator
from pipeline.layout import RunLayout, StageLayout
from pipeline.metrics import WindowLog
from pipeline.models.mixer import MixerSpec, MlpMixer
from pipeline.preemption import PREEMPTED_FLUSH_S, Preempted, Preemption
from pipeline.rng import rng_states, seed_everything


def run_stage(cfg: ExperimentConfig, stage_name: str, parent_run_id: str | None) -> dict:
    """Run one stage in this process (one rank of the launcher's job); returns the stage's result."""
    # DeepSpeed's ZeRO calls a collective that torch has renamed; the notice means nothing to a user.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    stage = cfg.stage(stage_name)
    env = dist.read_env(cfg.launch.device)
    dist.init_process_group(env)
    run = RunLayout(Path(cfg.output_dir))
    layout = run.stage(stage.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    spec = checkpoint.stage_specs(cfg, upto=stage.name)[stage.name]

    model = build_model(cfg, stage, spec, env.rank)
    plan = checkpoint.plan_resume(stage, run, eng.zero_stage_of(stage, cfg.deepspeed), env.rank, env.world_size)
    if plan.init is not None:
        checkpoint.init_weights(model, plan.init, new_head=stage.kind.new_head)
    engine = build_engine(cfg, stage, env, layout, model, load_universal=plan.reshard(env.world_size))
    # The shard indexes, read once: the checkpoints' fingerprint knows the data set by them, the stream reads them.
    sources = training_sources(cfg.datasets[stage.dataset], run.data_index) if stage.kind.trains else ()
    fingerprint = checkpoint.fingerprint(cfg, stage, spec, sources) if stage.kind.trains else {}
    restored = checkpoint.restore(engine, plan, fingerprint, stage_params(cfg, stage), env.rank, env.world_size)
    tracker = start_tracking(cfg, stage, env, layout, parent_run_id, restored.tags)
    started = time.time()
    try:
        runner = StageRunner(cfg, stage, env, engine, tracker, layout, spec, fingerprint)
        metrics = runner.train(restored.step, restored.data_state, sources) if stage.kind.trains else runner.evaluate()
        result = {
            "stage": stage.name,
            "kind": stage.kind,
            "steps": stage.steps,
            "wall_s": round(time.time() - started, 1),
            "world_size": env.world_size,
            **metrics,
            "run_id": tracker.run_id,
        }
        if stage.kind.trains:
            result |= runner.export()
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


def build_model(cfg: ExperimentConfig, stage: StageConfig, spec: MixerSpec, rank: int) -> MlpMixer:
    """The stage's model with identical initial weights on every rank; rank-specific randomness (dropout, data)
    is seeded after."""
    seed_everything(cfg.seed)
    model = MlpMixer(
        spec,
        cfg.datasets[stage.dataset].num_classes,
        stoch_depth=stage.stoch_depth,
        dropout=stage.dropout,
        gelu=cfg.model.gelu,
        stacked=cfg.model.stacked,
        remat=cfg.model.remat,
        fused_gelu=cfg.model.fused_gelu,
    )
    seed_everything(cfg.seed + 1000 * (rank + 1))
    return model


def build_engine(
    cfg: ExperimentConfig,
    stage: StageConfig,
    env: dist.DistEnv,
    layout: StageLayout,
    model: MlpMixer,
    load_universal: bool,
) -> eng.Engine:
    """The stage's DeepSpeed engine, its generated config kept beside the stage's other files."""
    ds_config = eng.build_config(stage, cfg.deepspeed, env.world_size, env.device, load_universal=load_universal)
    if env.is_primary:
        layout.deepspeed_config.write_text(json.dumps(ds_config, indent=2))
    compile_mode = cfg.deepspeed.compile_mode if cfg.deepspeed.compile else None
    return eng.build_engine(model, stage, ds_config, compile_mode, cfg.deepspeed.fp8)


def start_tracking(
    cfg: ExperimentConfig,
    stage: StageConfig,
    env: dist.DistEnv,
    layout: StageLayout,
    parent_run_id: str | None,
    resume_tags: dict[str, str],
) -> tracking.NullTracker:
    """The stage's MLflow run (continued after a resume): where and how this attempt ran (a requeued job may land
    elsewhere: the world and the communication settings), and the params and config files on its first attempt."""
    tracker = tracking.start_stage(cfg, stage.name, stage.kind, layout.run_id, parent_run_id, env.is_primary)
    launched = {"launch/world_size": str(env.world_size), "launch/device": str(env.device.type)}
    launched |= {f"env/{k}": v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL_"))}
    tracker.set_tags(resume_tags | launched)
    if not tracker.resumed:
        tracker.log_params(stage_params(cfg, stage))
        tracker.log_artifact(RunLayout(Path(cfg.output_dir)).config)
        tracker.log_artifact(layout.deepspeed_config)
    return tracker


class StageRunner:
    """The loop of one stage on one rank: step, log, maybe evaluate, maybe save or stop."""

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
        self.layout, self.fingerprint, self.spec = layout, fingerprint, spec
        self.last_save = time.time()
        self.final_tag: str | None = None  # the stage's last checkpoint, once `train` has saved or found it
        self.dataset = cfg.datasets[stage.dataset]
        self.preemption = Preemption()
        self.dtype = torch.bfloat16 if eng.uses_bf16(cfg.deepspeed, env.device) else torch.float32
        self.evaluate = Evaluator(cfg, stage, env, engine, tracker, spec.image_size, self.dtype)
        self.stream: Stream | None = None
        self.report = WindowLog(cfg, stage, env, engine, tracker, spec)
        self.saver = checkpoint.Saver(
            engine,
            layout.checkpoints,
            rank=env.rank,
            world_size=env.world_size,
            keep=stage.checkpoint_keep,
            background=stage.checkpoint_async and stage.kind.trains,
        )

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
        self.report.window.paused_s += self.last_save - started
        self.tracker.log_metrics({"checkpoint/save_s": self.last_save - started}, step)
        return tag

    def export(self) -> dict:
        """The stage's last checkpoint and (primary rank) its consolidated weights, registered as a model version
        where `tracking.log_model` says so; returns their paths for the result."""
        cfg, layout, tag = self.cfg, self.layout, self.final_tag
        out = {"checkpoint": str(layout.checkpoints / tag)}
        if self.env.is_primary:
            zero = eng.zero_stage_of(self.stage, cfg.deepspeed)
            weights = checkpoint.export(
                self.engine, layout, tag, self.spec, self.dataset.num_classes, zero, cfg.model.gelu
            )
            out["weights"] = str(weights)
            if cfg.tracking.log_model:
                registered = cfg.tracking.experiment or cfg.name
                self.tracker.log_model([weights, layout.model_config], registered, {"stage": self.stage.name})
            else:
                self.tracker.log_artifact(layout.model_config)
        return out

    def train(self, start_step: int, data_state: dict | None, sources: tuple[ShardIndex, ...]) -> dict:
        """The remaining steps over `sources`, the final checkpoint (`final_tag`), then the final evaluation: saved
        first, so that a failing evaluation loses no training and a rerun only evaluates again."""
        self.stream = self._train_stream(data_state, sources)
        try:
            self._train_steps(start_step)
        finally:
            # Loader workers ignore SIGTERM (see stream); they must be stopped here, or exit would wait on them.
            self.stream.close()
        end = checkpoint.tag_for(self.stage.steps)
        resumed_at_end = start_step == self.stage.steps and end in checkpoint.complete_tags(self.layout.checkpoints)
        self.final_tag = end if resumed_at_end else self.save(self.stage.steps, wait=True)  # the export reads it
        dist.barrier()
        return {**self.report.metrics, **self.evaluate(self.stage.steps)}

    def _train_stream(self, data_state: dict | None, sources: tuple[ShardIndex, ...]) -> Stream:
        stage, env, data = self.stage, self.env, self.cfg.data
        plan = stream_plan(self.cfg, stage, env.rank, env.world_size, sources)
        if data.decode == "gpu":
            if env.device.type != "cuda":
                raise ConfigError("data.decode=gpu needs a CUDA device; use data.decode=cpu here")
            return gpu_stream(
                plan,
                stage.augment,
                self.spec.image_size,
                env.device,
                state=data_state,
                max_bad_fraction=data.max_bad_fraction,
            )
        prepare = cpu_prepare(train_transform(stage.augment, self.spec.image_size))
        return TrainStream(
            plan, prepare, collate=stack_images, state=data_state, max_bad_fraction=data.max_bad_fraction
        )

    def _train_steps(self, start_step: int) -> None:
        stage = self.stage
        step_seed = seed_of(self.cfg.seed, zlib.crc32(stage.name.encode()), self.env.rank)
        mix = batch_transform(stage.augment, self.dataset.num_classes)
        accumulation = stage.accumulation(self.env.world_size)
        report = self.report
        report.start(start_step, accumulation)
        for step in range(start_step + 1, stage.steps + 1):
            # Mixup, stochastic depth and dropout draw from a generator seeded per step: a resumed run replays them.
            torch.manual_seed(seed_of(step_seed, step))
            for _ in range(accumulation):
                waited = time.perf_counter()
                batch = next(self.stream)
                report.window.data_wait_s += time.perf_counter() - waited
                images, labels = to_device(*batch, self.env.device)
                if mix is not None:
                    images, labels = mix(images, labels)  # labels: (B, classes) probabilities
                loss = F.cross_entropy(self.engine(images.to(self.dtype)).float(), labels)
                self.engine.backward(loss)
                self.engine.step()
                report.loss_sum += loss.detach()
            report.step_done()
            if step % stage.log_every == 0 or step == stage.steps:
                report.log(step, self.stream)
            if stage.eval_every and step % stage.eval_every == 0 and step != stage.steps:
                evaluated = time.time()
                self.evaluate(step)
                report.window.paused_s += time.time() - evaluated
            if step != stage.steps and self._save_or_stop(step):
                report.close()
                raise Preempted(stage.name, step)
        self.preemption.settle()
        report.close()

    def _save_or_stop(self, step: int) -> bool:
        """A checkpoint when one is due (every `checkpoint_every` steps or minutes) or a stop was requested; the
        ranks agree on both, as their clocks and signals differ. True: stop (the save is complete)."""
        minutes = self.stage.checkpoint_every_minutes
        late = minutes > 0 and time.time() - self.last_save > 60 * minutes
        waited = time.perf_counter()
        stop, late = self.preemption.agreed(late)
        self.report.window.sync_wait_s += time.perf_counter() - waited
        every = self.stage.checkpoint_every
        if stop or late or (every and step % every == 0):
            self.save(step, wait=stop)  # a stop saves too, once, and waits for it
        return stop
