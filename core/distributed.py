"""torch.distributed for the stage scripts, launched with torchrun (`torchrun --nproc_per_node=K decoding.py ...`).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process; without them a script runs as
one process (rank 0 of 1) and nothing here starts a process group. NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that writes checkpoints, output files, run files and wandb."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous share of n items: ranks in order cover 0..n-1 once."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def device(self, gpu_id) -> torch.device:
        """One GPU per process under torchrun (cuda:LOCAL_RANK), else `job_device(gpu_id)`."""
        if self.size > 1 and torch.cuda.is_available():
            return torch.device(f"cuda:{self.local_rank}")
        return job_device(gpu_id)


def select_device(gpu_id: int | None = 0) -> torch.device:
    """CUDA device `gpu_id` when CUDA is present, the CPU otherwise."""
    if torch.cuda.is_available() and gpu_id is not None and int(gpu_id) >= 0:
        if int(gpu_id) >= torch.cuda.device_count():
            raise ValueError(f"gpu_id={gpu_id}, but only {torch.cuda.device_count()} CUDA device(s) are present")
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def job_device(gpu_id) -> torch.device:
    """The device of this job: CUDA device `gpu_id` (the CPU without CUDA, or with gpu_id < 0), except
    in a sweep run by the joblib launcher with several GPUs visible, where job n takes GPU
    (gpu_id + n) mod count, so that parallel jobs spread over the GPUs instead of sharing one."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 1 and gpu_id is not None and int(gpu_id) >= 0:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized() and "joblib" in str(HydraConfig.get().launcher.get("_target_", "")):
            return select_device((int(gpu_id) + HydraConfig.get().job.num) % torch.cuda.device_count())
    return select_device(gpu_id)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def current_world() -> World:
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


@contextlib.contextmanager
def process_group():
    """The world of this process; with WORLD_SIZE > 1 a process group is started (once per process:
    the jobs of a sweep run one after another in the same processes and share it) and the ranks meet
    at the end of the block."""
    world = current_world()
    if world.size == 1:
        yield world
        return
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend)
        atexit.register(dist.destroy_process_group)
    yield world
    dist.barrier()


def gather_arrays(world: World, arrays: list[np.ndarray]) -> list[np.ndarray] | None:
    """On rank 0, each array concatenated over the ranks in rank order; None on the other ranks."""
    if world.size == 1:
        return arrays
    gathered = [None] * world.size if world.is_main else None
    dist.gather_object(arrays, gathered, dst=0)
    if not world.is_main:
        return None
    return [np.concatenate([part[i] for part in gathered]) for i in range(len(arrays))]


def data_parallel() -> World | None:
    """The world when this process is one of several in a started process group, else None."""
    world = current_world()
    return world if world.size > 1 and dist.is_available() and dist.is_initialized() else None


# --------------------------------------------------------------------------- losses over the global batch
#
# Under torchrun each rank computes the loss of its share of the global batch and the gradients are
# summed over the ranks (`sum_gradients`). A loss that is not a mean over rows (a mean over
# positions, a batch sum, a state updated from the whole batch) declares
# `loss_reduces_over_ranks = True` on its model and computes its rank's part of the global batch's
# loss with the helpers below: the parts, and their gradients, then add up to the loss of one process
# on the whole batch. Each helper is the identity in one process, so single-process runs keep their
# arithmetic (and recorded results) bit for bit. The trainer weights any other loss by its rank's
# share of the rows, which is exact for row means.

_ALONE = False  # set while one rank takes a batch too small to share (`rank_alone`)


def _reducing() -> World | None:
    return None if _ALONE else data_parallel()


@contextlib.contextmanager
def rank_alone():
    """While the batch has fewer rows than there are ranks, rank 0 computes all of it and the helpers
    below reduce nothing (the other ranks compute nothing and add zero gradients)."""
    global _ALONE
    previous, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = previous


def summed_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """`value` (a count, a sum of weights, a loss that only steers) summed over the ranks, as a constant
    through which no gradient flows; `value` itself in one process."""
    if _reducing() is None:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def count_over_ranks(n: int) -> int:
    """A count summed over the ranks (`n` in one process)."""
    if _reducing() is None:
        return n
    return int(summed_over_ranks(torch.tensor(n, dtype=torch.int64)).item())


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """This rank's part of the mean of `values` over the global batch (`values.mean()` in one process)."""
    if _reducing() is None:
        return values.mean()
    return values.sum() / count_over_ranks(values.numel())


def rows_over_ranks(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The global batch's rows (each rank's `rows`, in rank order: the order of the global batch,
    which the ranks share out contiguously) and where this rank's rows start; `(rows, 0)` in one process."""
    world = _reducing()
    if world is None:
        return rows, 0
    sizes = all_gather(world, len(rows))
    widest = max(sizes)
    padded = rows.new_zeros((widest, *rows.shape[1:]))
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sum(sizes[: world.rank])


def shared_permutation(n: int, device=None) -> torch.Tensor:
    """A uniform permutation of range(n), the same on every rank: rank 0 draws it from its generator
    and sends it (`torch.randperm(n)` in one process)."""
    world = _reducing()
    permutation = torch.randperm(n, device=device) if world is None or world.is_main else \
        torch.empty(n, dtype=torch.int64, device=device)
    if world is not None:
        dist.broadcast(permutation, src=0)
    return permutation


def barrier(world: World | None) -> None:
    if world is not None:
        dist.barrier()


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights on every rank."""
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def sum_gradients(model: torch.nn.Module) -> None:
    """Each gradient summed over the ranks, in one flat all-reduce (a missing gradient counts as 0).

    The ranks weight their losses by their share of the global batch, so the sum is the gradient
    of the global batch: what DistributedDataParallel computes, without wrapping the model (the
    objectives call its methods, not its forward)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    at = 0
    for p in parameters:
        p.grad.copy_(flat[at:at + p.numel()].view_as(p))
        at += p.numel()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def all_gather(world: World, value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values
