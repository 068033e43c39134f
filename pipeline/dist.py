"""The only reader of launcher environment variables (torchrun, the DeepSpeed launcher, accelerate, Slurm).

torchrun, `deepspeed` and `accelerate launch` all export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; under a bare `srun` the SLURM_* variables stand in for them.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        """Rank 0 alone logs, prints and writes run metadata."""
        return self.rank == 0


# Hardware work queues per GPU (CUDA's default is 8). Streams beyond that many share queues, and a kernel then
# waits behind unrelated work of another stream in its queue. nvJPEG decodes on streams of its own (14 of them), so
# with 8 queues its per-image copies and kernels held up the training step's: on one H100, Mixer-B/16 trained from
# JPEG shards at 86.1% of its synthetic-input rate, 92.5% with 32 queues (docs/BENCHMARKS.md). CUDA reads the
# variable when it makes the context.
CUDA_QUEUES = "32"


def prepare_cuda_env() -> None:
    """Settings CUDA reads when this process first uses the GPU; a value already in the environment wins."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", CUDA_QUEUES)


def visible_gpus(device: str = "auto") -> int:
    """CUDA devices this process may use (CUDA_VISIBLE_DEVICES applied); 0 when `device` is "cpu" or none is
    there. Asks the driver without making a CUDA context, so a parent process stays free of one."""
    return 0 if device == "cpu" else torch.cuda.device_count()


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def read_env(device: str = "auto") -> DistEnv:
    """Where this process sits in the job, from the launcher's variables (a single process if none)."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


# How many ranks share this node, as each launcher says it: torchrun, the DeepSpeed launcher, srun.
_LOCAL_RANKS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def share_cpu_threads() -> None:
    """This rank's intra-op threads: its share of the node's cores, unless OMP_NUM_THREADS is set. `mixer run`
    sets the share for torchrun (`stages.stage_env`); the DeepSpeed launcher and srun set nothing, and each rank
    then took every core: `deepspeed --num_gpus 2` ran the tiny config's eval stage on a 2-core machine in 61 s,
    and in 19 s with each rank on its share."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    ranks = next((os.environ[n] for n in _LOCAL_RANKS if os.environ.get(n, "").isdigit()), "1")
    torch.set_num_threads(cores_per_rank(int(ranks)))


def cores_per_rank(ranks_on_node: int) -> int:
    """This node's cores shared out over its ranks, at least one each."""
    return max(1, (os.cpu_count() or 1) // max(1, ranks_on_node))


def init_process_group(env: DistEnv, timeout_s: int = 1800) -> None:
    """NCCL on GPUs, gloo on CPU (each rank with its share of the cores). DeepSpeed reuses this group."""
    if torch_dist.is_initialized():
        return
    share_cpu_threads()
    # DeepSpeed reads these itself; under a bare `srun` or a single process only we know them.
    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
        os.environ.setdefault(name, str(value))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A process on its own (no launcher) takes any free port, so that several on one machine do not collide.
        os.environ["MASTER_PORT"] = str(free_port()) if env.world_size == 1 else "29500"
    torch_dist.init_process_group(
        backend="nccl" if env.device.type == "cuda" else "gloo",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=env.device if env.device.type == "cuda" else None,
    )
    global _host_group
    if env.device.type == "cuda" and env.world_size > 1:
        # Host-side numbers (a stop request, a loss total) go over gloo: through NCCL each would need a copy to the
        # GPU and back, a device synchronisation that stalls the training stream every step.
        _host_group = torch_dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


_host_group: torch_dist.ProcessGroup | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


class Reducing:
    """A host all-reduce, finished or under way in the background; `result()` waits for it."""

    def __init__(self, tensor: torch.Tensor, work: torch_dist.Work | None) -> None:
        self.tensor, self.work = tensor, work

    def result(self) -> list[float]:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor.tolist()


def _all_reduce_host(values: list[float], op: torch_dist.ReduceOp, background: bool = False) -> Reducing:
    tensor = torch.tensor(values, dtype=torch.float64)
    work = None
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        # group None: the default group, gloo on CPU
        work = torch_dist.all_reduce(tensor, op=op, group=_host_group, async_op=background)
    return Reducing(tensor, work)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few host numbers over ranks (identity on one process); never touches the GPU."""
    return _all_reduce_host(values, torch_dist.ReduceOp.SUM).result()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise largest of a few host numbers over ranks, in one collective; never touches the GPU."""
    return _all_reduce_host(values, torch_dist.ReduceOp.MAX).result()


def all_reduce_max_started(values: list[float]) -> Reducing:
    """`all_reduce_max`, begun now over gloo and finished by `result()`: the host goes on in the meantime."""
    return _all_reduce_host(values, torch_dist.ReduceOp.MAX, background=True)


def all_gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order (small, picklable things: features of an evaluation set)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    global _host_group
    _host_group = None
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
