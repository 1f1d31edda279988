"""Atomic, resumable checkpoints: trainable weights, optimiser, scheduler, RNG and data position.

A checkpoint is written into `checkpoints/.step-N.partial/` and renamed to `checkpoints/step-N/` only when
complete, so a crash while writing never leaves a directory that looks like a finished checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunesmith._core import dist
from tunesmith._core.errors import TunesmithError
from tunesmith._core.seed import rng_state, set_rng_state
from tunesmith.training import fsdp

_STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes: adapter weights for LoRA, every weight for full fine-tuning. Fully sharded
    (`train.fsdp`), every process calls it and each weight is gathered whole in turn: process 0 gets them
    all, the others an empty dict."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            value = fsdp.whole(p.detach())
            if dist.is_main():
                out[n] = value.contiguous().cpu()
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep_last: int, loss_scale: dict | None = None) -> Path:
    """Write checkpoint `step`, then delete all but the newest `keep_last`. `loss_scale`: an fp16 run's
    loss-scaler state. Data parallel, every process calls it: process 0 writes the checkpoint, each other
    process adds its own RNG state (its dropout) and, with a sharded optimiser, its optimiser state
    (`process-N.pt`) before process 0 makes the checkpoint complete, and all return once it is."""
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.partial"
    weights = trainable_state(model)  # fully sharded, a collective; process 0's alone otherwise
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.world_size() > 1:
        dist.barrier()  # the folder exists
        if not dist.is_main():
            torch.save({"rng": rng_state(),
                        "optimizer": fsdp.local_state(optimizer.state_dict()) if _own_state(optimizer) else None},
                       tmp / f"process-{dist.rank()}.pt")
        dist.barrier()  # every process's RNG is in it
        if not dist.is_main():
            dist.barrier()  # process 0 has made it complete
            return final
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": fsdp.local_state(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "loss_scale": loss_scale}, tmp / "training_state.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _check_learning_rates(path: Path, blob: dict, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Refuse a checkpoint whose optimiser groups or peak learning rates are not this run's. Loading it would
    put the saved rates back in silence: a resume with a new `train.lr` would go on at the old one."""
    sizes = [len(g["params"]) for g in blob["optimizer"]["param_groups"]]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != ours:
        raise TunesmithError(f"cannot resume from {path}: its optimiser has parameter groups of {sizes} tensors, "
                             f"this run's of {ours} (train.lora_plus_ratio or the method changed since it was "
                             "written)")
    saved, peak = blob["scheduler"]["base_lrs"], scheduler.base_lrs
    if any(not math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved, peak)):
        raise TunesmithError(f"cannot resume from {path}: it was trained at peak learning rates {saved}, this "
                             f"config gives {peak} (train.lr, train.lora_plus_ratio or rl.value_lr changed)")
    for key, setting in (("weight_decay", "train.weight_decay"), ("betas", "train.betas")):  # as for the rates
        was = [g.get(key) for g in blob["optimizer"]["param_groups"]]
        now = [g.get(key) for g in optimizer.param_groups]
        if any(a is not None and b is not None and not _close(a, b) for a, b in zip(was, now)):
            raise TunesmithError(f"cannot resume from {path}: it was trained with {key} {was}, this config gives "
                                 f"{now} ({setting} changed); loading it would put the old values back")


def _close(a: Any, b: Any) -> bool:
    a, b = (a, b) if isinstance(a, (tuple, list)) else ((a,), (b,))
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b))


def _sharded(optimizer: torch.optim.Optimizer) -> bool:
    from tunesmith.training.optim import ShardedOptimizer

    return isinstance(optimizer, ShardedOptimizer)


def _fully_sharded(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimiser steps FSDP shards (`train.fsdp`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])


def _own_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether each process's optimiser state is its own (sharded either way), saved by each process."""
    return _sharded(optimizer) or _fully_sharded(optimizer)


def check_processes(path: Path, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Refuse a checkpoint written by a run of another number of processes (data parallel): each step's
    work is shared out by process, so the run goes on only with as many; and one whose optimiser state was
    sharded (`train.shard_optimizer`) where this run's is not, or the other way round."""
    saved = state.get("processes", 1)
    if saved != dist.world_size():
        raise TunesmithError(f"cannot resume from {path}: it was written by a run of {saved} processes, this one "
                             f"has {dist.world_size()} (each step's work is shared out by process: start it with "
                             "as many)")
    if bool(state.get("optimizer_shards")) != _sharded(optimizer):
        raise TunesmithError(f"cannot resume from {path}: its optimiser state was "
                             f"{'' if state.get('optimizer_shards') else 'not '}sharded over the processes, this "
                             "run's is" + ("" if _sharded(optimizer) else " not") + " (train.shard_optimizer)")
    if bool(state.get("fsdp")) != _fully_sharded(optimizer):
        raise TunesmithError(f"cannot resume from {path}: it was written by a run " +
                             ("with" if state.get("fsdp") else "without") + " train.fsdp, this one runs " +
                             ("with" if _fully_sharded(optimizer) else "without") + " it")


def processes_state(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What `state.json` records of the processes: their number, in a data-parallel run, and whether each
    keeps the optimiser state of its own share (`optimizer_shards`)."""
    if dist.world_size() == 1:
        return {}
    return {"processes": dist.world_size(), **({"optimizer_shards": dist.world_size()} if _sharded(optimizer) else {}),
            **({"fsdp": dist.world_size()} if _fully_sharded(optimizer) else {})}


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loss_scale: Any = None) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns the saved state dict (step, data position...).
    `loss_scale` (a `LossScaling`) gets the loss scale back; a checkpoint of a run without one leaves it be.
    One written by another number of processes, or with its optimiser sharded where this one's is not (or
    the other way round), is refused before anything is loaded."""
    state = json.loads((path / "state.json").read_text())
    check_processes(path, state, optimizer)
    weights = load_file(str(path / "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise TunesmithError(f"checkpoint {path} holds different trainable parameters than this model "
                         f"(missing {sorted(expected - set(weights))[:3]}, extra {sorted(set(weights) - expected)[:3]}); "
                         "was the method or model changed since it was written?")
    blob = torch.load(path / "training_state.pt", weights_only=False)
    own = path / f"process-{dist.rank()}.pt"  # data parallel: a process other than 0 has its own
    own = torch.load(own, weights_only=False) if dist.rank() and own.exists() else {}
    if own.get("optimizer") is not None:  # its share of a sharded optimiser
        blob = {**blob, "optimizer": own["optimizer"]}
    _check_learning_rates(path, blob, optimizer, scheduler)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            fsdp.copy_whole_(params[name], value)
    if _fully_sharded(optimizer):
        fsdp.load_optimizer_state(optimizer, blob["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(own.get("rng") or blob["rng"])
    if loss_scale is not None:
        loss_scale.load_state_dict(blob.get("loss_scale"))
    return state
