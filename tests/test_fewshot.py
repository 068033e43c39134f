import pytest
import torch

from pipeline.fewshot import fewshot_accuracy, ridge_weights


@pytest.mark.parametrize("n", [40, 8])  # more points than dimensions, and fewer (the kernel form)
def test_ridge_solves_the_regularised_normal_equations(n):
    torch.manual_seed(0)
    x = torch.randn(n, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    w = ridge_weights(x, y, 3, l2=2.0)
    t = 2.0 * torch.nn.functional.one_hot(y, 3).double() - 1.0
    # The gradient of |XW - T|^2 + l2 |W|^2 vanishes at the solution.
    assert torch.allclose(x.T @ (x @ w - t) + 2.0 * w, torch.zeros_like(w), atol=1e-9)


def test_separable_classes_are_recognised_from_few_shots():
    torch.manual_seed(0)
    centres = torch.randn(4, 32) * 5
    train_y, test_y = torch.arange(4).repeat(10), torch.arange(4).repeat(50)
    train_x = centres[train_y] + torch.randn(40, 32)
    test_x = centres[test_y] + torch.randn(200, 32)
    assert fewshot_accuracy(train_x, train_y, test_x, test_y, 4, shots=5, l2=1024.0, seed=0) > 0.95
    # Random features give chance-level accuracy: the metric can fail.
    noise = torch.randn(200, 32)
    assert fewshot_accuracy(torch.randn(40, 32), train_y, noise, test_y, 4, shots=5, l2=1024.0, seed=0) < 0.5


def test_seed_draws_different_shots_and_too_few_examples_is_an_error():
    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.arange(4).repeat(10)
    results = {fewshot_accuracy(x, y, x, y, 4, shots=2, l2=1.0, seed=s) for s in range(5)}
    assert len(results) > 1
    with pytest.raises(ValueError, match="fewer than 25 shots"):
        fewshot_accuracy(x, y, x, y, 4, shots=25, l2=1.0, seed=0)
