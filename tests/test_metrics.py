"""A training window's clock: throughput and the waits are shares of the time spent training, not of the time
spent evaluating or saving inside the window."""

import time

import pytest

from pipeline.metrics import Window


def test_a_window_leaves_out_the_time_it_was_paused():
    window = Window(start=time.time() - 10.0, paused_s=4.0)
    assert window.training_s() == pytest.approx(6.0, abs=0.5)
    window.paused_s += 6.0 - 0.1
    assert 0 < window.training_s() < 0.7
