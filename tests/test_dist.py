"""Process groups: a process started without a launcher does not need port 29500 to itself."""

import os
import socket
import subprocess
import sys

from tests.conftest import REPO

ONE_RANK = """
import os, torch.distributed as td
from pipeline import dist
dist.init_process_group(dist.read_env("cpu"))
print(os.environ["MASTER_PORT"], td.get_world_size())
"""


def test_one_process_without_a_launcher_starts_while_29500_is_taken():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 29500))  # another run on this machine
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-c", ONE_RANK], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
    assert result.returncode == 0, result.stderr[-2000:]
    port, world_size = result.stdout.split()
    assert port != "29500" and world_size == "1"
