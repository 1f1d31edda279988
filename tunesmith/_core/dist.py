"""Data-parallel training over several processes, one per GPU, started by `torchrun`.

torchrun puts RANK, LOCAL_RANK and WORLD_SIZE in each process's environment; `join()` makes the process
group from them (NCCL for CUDA tensors and gloo for host tensors on a GPU machine, gloo alone on a CPU).
Without torchrun a process is a world of one, and every function here does nothing: single-process code
pays for none of it.

Every process holds the whole model and trains on its own share of each optimiser step's micro-batches;
`fit()` sums the gradients over the processes (`reduce_gradients`) and divides by the loss tokens of the
whole step, counted over every process (`sum_host`), so N processes with accumulation A train exactly as
one process with accumulation N x A. The online-RL loop shares out sampling, scoring and its passes the
same way (`training.online`). Process 0 (`is_main`) writes the run directory. Under `train.fsdp` the
weights, gradients and moments are sharded instead (`training.fsdp`), with the same normalisation.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator, Sequence

# Long enough for what process 0 does alone while the others wait at their next collective: writing a full
# model's checkpoint or the result, a reward model's or classifier's scores after training.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("TUNESMITH_DIST_TIMEOUT_MIN", "60")))
BUCKET_BYTES = 64 * 2**20  # gradients summed in flat buckets of at most this size: a few collectives a step


def _initialised() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def launched_world() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's index among the processes torchrun started (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine: the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def join() -> None:
    """Join the process group torchrun set up the environment for; once per process, a no-op without
    torchrun. On CUDA each process takes GPU `LOCAL_RANK` as its device, so `cuda` means that GPU."""
    if launched_world() <= 1 or _initialised():
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        if local_rank() >= torch.cuda.device_count():
            raise RuntimeError(f"process {local_rank()} on this machine has no GPU of its own: "
                               f"{torch.cuda.device_count()} visible, --nproc-per-node must not exceed it")
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)


def leave() -> None:
    """Tear the process group down (at the end of a run in this process)."""
    if _initialised():
        import torch.distributed as dist

        dist.destroy_process_group()


def world_size() -> int:
    if not _initialised():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def rank() -> int:
    if not _initialised():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def is_main() -> bool:
    """Whether this process writes the run directory and prints (process 0, or the only one)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Process 0 runs the body first, the others after it: for work that writes a file the others then
    read (a converted model, precomputed reference log-probs) rather than every process writing it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def sum_host(values: Sequence[float]) -> list[float]:
    """Each value summed over the processes, on the host (gloo): token counts, which the host knows
    before the step's forwards and which never wait for a GPU."""
    if world_size() == 1:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def sum_(tensor: Any) -> Any:
    """`tensor` summed over the processes, in place, where it lives (queued behind the GPU's work on CUDA)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def broadcast_(tensors: Sequence[Any]) -> None:
    """Process 0's values into every process's `tensors`, in place (in buckets, `broadcast_from_owners`)."""
    broadcast_from_owners(tensors, [0] * len(tensors))


def broadcast_from_owners(params: Sequence[Any], owners: Sequence[int], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Each parameter's values from the process that `owners` names, into every process, in place: flat
    buckets of one owner, dtype and device of at most `bucket_bytes`, one broadcast each."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    groups: dict[tuple, list] = {}
    for p, owner in zip(params, owners):
        # detached, not .data: the copy counts as a change to the weight (its version), as caches of it expect
        groups.setdefault((owner, p.device, p.dtype), []).append(p.detach())
    for (owner, _, _), tensors in groups.items():  # the same order in every process: the parameters' own
        for bucket in _buckets(tensors, bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.broadcast(flat, src=owner)
            _unflatten(flat, bucket)


def _buckets(tensors: list[Any], bucket_bytes: int) -> list[list[Any]]:
    """`tensors` in consecutive runs of at most `bucket_bytes` (a larger tensor alone)."""
    out: list[list[Any]] = []
    size = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if not out or size + n > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(t)
        size += n
    return out


def _unflatten(flat: Any, tensors: list[Any]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def share(items: Sequence[Any]) -> list[Any]:
    """This process's share of `items`: items r, r + N, r + 2N, ... in process r of N (all of them alone)."""
    return [items[i] for i in range(rank(), len(items), world_size())]


def gather_shares(results: list[Any], n: int, per_item: int = 1) -> list[Any]:
    """Every process's `results` for its `share` of `n` items (`per_item` results an item, in order), in
    every process, back in the items' order."""
    world = world_size()
    if world == 1:
        return results
    shares = gather_object(results)
    return [x for i in range(n) for x in shares[i % world][(i // world) * per_item:(i // world + 1) * per_item]]


def gather_object(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in process order."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_gradients(params: Sequence[Any], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum each parameter's gradient over the processes, in place. A parameter that got no gradient in
    any process keeps none (the optimiser skips it, as it would in one process); one that got a gradient
    in some processes only takes zeros in the others. Gradients of one dtype and device go in flat buckets
    of at most `bucket_bytes`, one collective each."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    had = sum_host([p.grad is not None for p in params])
    live = [p for p, n in zip(params, had) if n > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple, list] = {}
    for p in live:
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        for bucket in _buckets(grads, bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            _unflatten(flat, bucket)
