import json
import random
import subprocess
import sys

import numpy as np
import torch

from pipeline.train import rng_states, set_rng_states
from tests.conftest import REPO


def test_random_generators_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_states()))  # as a checkpoint stores it
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_states(saved)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_a_stop_signal_before_the_training_loop_is_kept_as_a_request():
    # As `mixer stage` does first thing: SIGTERM during set-up (or while a failing rank closes its runs, when torchrun
    # stops the other ranks) must not end the process there.
    script = """
import os, signal, time
from pipeline.train import Preemption
Preemption.catch()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print(Preemption().requested)  # the runner's instance, made later, still sees it
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]
