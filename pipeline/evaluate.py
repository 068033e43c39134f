"""Held-out evaluation of a stage's model on every rank: top-1/top-5/loss per crop, and big_vision's few-shot."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline import dist, tracking
from pipeline.config import ExperimentConfig, FewShotConfig, StageConfig
from pipeline.data.index import ShardIndex, read_index
from pipeline.data.stream import eval_batches
from pipeline.data.transforms import eval_transform, to_device
from pipeline.fewshot import fewshot_accuracy

if TYPE_CHECKING:
    from pipeline.engine import Engine


class Evaluator:
    """Evaluates a stage's DeepSpeed engine on the stage's held-out split (few-shot: on its module's pre-logit
    features); the ranks share the samples and sum their counts."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        stage: StageConfig,
        env: dist.DistEnv,
        engine: Engine,
        tracker: tracking.NullTracker,
        image_size: int,
        dtype: torch.dtype,
    ) -> None:
        self.cfg, self.stage, self.env, self.engine, self.tracker = cfg, stage, env, engine, tracker
        self.dataset = cfg.datasets[stage.dataset]
        self.image_size, self.dtype = image_size, dtype

    @torch.no_grad()
    def __call__(self, step: int = 0) -> dict:
        """Top-1, top-5 and loss on the held-out split (`eval/...`, and `eval/<crop>/...` for each extra crop),
        summed over ranks; few-shot accuracy if configured. Logged at `step`."""
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
            images, labels = to_device(images, labels, self.env.device)
            yield images.to(self.dtype), labels

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
            raise RuntimeError(f"no readable samples in {index.name}")
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
