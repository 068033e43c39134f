"""What a stage's training reports every `log_every` steps: loss over all ranks, throughput and MFU, memory, where
each rank's host spent the window's time, and bad data; to the tracker and the progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from pipeline import dist, tracking
from pipeline import engine as eng
from pipeline.config import ExperimentConfig, StageConfig
from pipeline.data.stream import Stream
from pipeline.flops import peak_flops, train_flops_per_image
from pipeline.models.mixer import MixerSpec


@dataclass
class Window:
    """The steps since the last logged one, and where this rank's host spent their wall time."""

    start: float = field(default_factory=time.time)
    steps: int = 0
    paused_s: float = 0.0  # evaluations and checkpoint saves: not training
    data_wait_s: float = 0.0  # blocked on the loader for the next batch
    sync_wait_s: float = 0.0  # blocked on the other ranks, agreeing on a stop or a time-based save

    def training_s(self) -> float:
        return time.time() - self.start - self.paused_s


class WindowLog:
    """The training loop's metrics on one rank: it adds each micro-batch's loss to `loss_sum` and its waits to
    `window`; `log` turns the window into metrics (`metrics`: the latest) and starts a new one."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        stage: StageConfig,
        env: dist.DistEnv,
        engine: eng.Engine,
        tracker: tracking.NullTracker,
        spec: MixerSpec,
    ) -> None:
        self.cfg, self.stage, self.env, self.engine, self.tracker, self.spec = cfg, stage, env, engine, tracker, spec
        self.metrics: dict[str, float] = {}
        self.window = Window()
        self.bad_log: list[dict] = []
        self.bad_logged_at, self.bad_unlogged = 0.0, False
        self.bar: tqdm | None = None

    def start(self, start_step: int, accumulation: int) -> None:
        """Before the first step of this attempt: the progress bar, the MFU scale, a zero loss sum, a new window."""
        self.accumulation = accumulation
        # A live line on a terminal; in a log file (batch jobs, CI) a line every 20 s is enough.
        self.bar = tqdm(
            total=self.stage.steps,
            initial=start_step,
            desc=self.stage.name,
            unit="step",
            dynamic_ncols=True,
            disable=not self.env.is_primary,
            mininterval=0.2 if sys.stderr.isatty() else 20,
        )
        self.mfu_per_img_s = self._mfu_per_img_s()
        self.loss_sum = torch.zeros((), device=self.env.device)
        self.window = Window()

    def step_done(self) -> None:
        self.window.steps += 1
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    def _mfu_per_img_s(self) -> float:
        """MFU per image/s of the whole job; the peak it assumes goes into the run's tags (not params: a resumed
        run may measure a slightly different estimate, and params never change)."""
        peak, estimated = peak_flops(self.env.device, eng.matmul_dtype(self.cfg.deepspeed, self.env.device))
        source = "estimated (measured matmul)" if estimated else "datasheet"
        self.tracker.set_tags({"mfu/peak_tflops": f"{peak / 1e12:.2f}", "mfu/peak_source": source})
        num_classes = self.cfg.datasets[self.stage.dataset].num_classes
        return train_flops_per_image(self.spec, num_classes) / (peak * self.env.world_size)

    def log(self, step: int, stream: Stream) -> None:
        """The window's mean loss over all ranks (a non-finite one stops the stage), throughput, memory, where the
        host's time went and bad data, to the tracker and the progress bar; then a new window."""
        window, accumulation = self.window, self.accumulation
        # One sum over the ranks for the loss and the bad-data counts
        total, count, bad, read = dist.all_reduce_sum(
            [self.loss_sum.item(), window.steps * accumulation, stream.bad, stream.read]
        )
        mean_loss = total / count
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"stage {self.stage.name}: loss is {mean_loss} at step {step}")
        images = window.steps * self.stage.micro_batch * accumulation * self.env.world_size
        seconds = window.training_s()
        img_per_s = images / seconds
        cuda = self.env.device.type == "cuda"
        peak_gib = torch.cuda.max_memory_allocated(self.env.device) / 2**30 if cuda else 0.0
        # The slowest rank's numbers: the fullest card decides what fits, the longest wait what the job waits for.
        peak_gib, data_wait, sync_wait = dist.all_reduce_max(
            [peak_gib, window.data_wait_s / seconds, window.sync_wait_s / seconds]
        )
        metrics = {"train/peak_mem_gib": peak_gib} if cuda else {}
        self.metrics = metrics = {
            **metrics,
            **self._report_bad_data(stream, bad, read, final=step == self.stage.steps),
            "train/loss": mean_loss,
            "train/lr": self.engine.get_lr()[0],
            "train/epoch": stream.epoch + stream.position / stream.plan.batches_per_epoch,
            "train/img_per_s": img_per_s,
            "train/mfu": img_per_s * self.mfu_per_img_s,
            "train/data_wait_frac": data_wait,
            "train/sync_wait_frac": sync_wait,
            "train/skipped_steps": eng.skipped_steps(self.engine),  # inf/nan gradients: step not applied
        }
        self.tracker.log_metrics(metrics, step)
        shown = {"loss": f"{mean_loss:.4f}", "lr": f"{metrics['train/lr']:.2e}", "img_s": f"{img_per_s:.0f}"}
        if metrics["data/bad_samples"]:
            shown["skipped"] = f"{metrics['data/bad_samples']:.0f} bad"
        self.bar.set_postfix(shown)
        self.loss_sum.zero_()
        self.window = Window()

    def _report_bad_data(self, stream: Stream, bad: float, read: float, final: bool) -> dict:
        """Bad samples of all ranks (`bad` of `read`, summed over the ranks): counts as metrics; shard URL + key of
        each to `data/bad_samples.jsonl` (rewritten at most once a minute)."""
        events = list(stream.new_bad)
        stream.new_bad.clear()
        gathered = [e for part in dist.all_gather_objects(events) for e in part]
        self.bad_log.extend(gathered)
        del self.bad_log[: max(0, len(self.bad_log) - 10_000)]
        self.bad_unlogged |= bool(gathered)
        if self.bad_unlogged and (final or time.time() - self.bad_logged_at > 60):
            self.tracker.log_text("\n".join(json.dumps(e) for e in self.bad_log), "data/bad_samples.jsonl")
            self.bad_logged_at, self.bad_unlogged = time.time(), False
        return {"data/bad_samples": bad, "data/bad_fraction": bad / max(read, 1)}
