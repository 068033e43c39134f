"""Few-shot linear evaluation (the paper's "Metrics"; big_vision's protocol) on frozen pre-logit features.

For each seed, k examples per class are drawn from the training features; features are whitened with the shots'
statistics, a constant bias feature is appended (large, so it is barely regularised), and the closed-form
l2-regularised least-squares map to +-1 one-hot targets is solved; test accuracy is the argmax's.
"""

from __future__ import annotations

import torch

BIAS_FEATURE = 100.0


def ridge_weights(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> torch.Tensor:
    """W (D+1, C) minimising |XW - T|^2 + l2 |W|^2, X whitened plus a bias column, T in {-1, 1}."""
    targets = 2.0 * torch.nn.functional.one_hot(y, num_classes).double() - 1.0  # (N, C)
    n, d = x.shape
    if n >= d:  # (X^T X + l2 I)^-1 X^T T
        return torch.linalg.solve(x.T @ x + l2 * torch.eye(d, dtype=x.dtype), x.T @ targets)
    return x.T @ torch.linalg.solve(x @ x.T + l2 * torch.eye(n, dtype=x.dtype), targets)  # X^T (X X^T + l2 I)^-1 T


def _prepare(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = (x.double() - mean) / std
    return torch.nn.functional.pad(x, (0, 1), value=BIAS_FEATURE)


def fewshot_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    shots: int,
    l2: float,
    seed: int,
) -> float:
    """Test accuracy of the ridge classifier fitted on `shots` random training examples per class."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        candidates = (train_y == c).nonzero().squeeze(1)
        if len(candidates) < shots:
            raise ValueError(f"class {c} has {len(candidates)} training examples, fewer than {shots} shots")
        picks.append(candidates[torch.randperm(len(candidates), generator=generator)[:shots]])
    index = torch.cat(picks)
    x = train_x[index].double()
    mean, std = x.mean(0, keepdim=True), x.std(0, unbiased=False, keepdim=True) + 1e-5
    w = ridge_weights(_prepare(x, mean, std), train_y[index], num_classes, l2)
    predictions = (_prepare(test_x, mean, std) @ w).argmax(dim=1)
    return float((predictions == test_y).double().mean())
