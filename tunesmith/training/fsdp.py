"""Fully sharded data parallel for `fit()` (`train.fsdp`): torch's FSDP2 (`fully_shard`) over the processes
torchrun started.

Plain data parallel keeps the whole model, its gradients and (without `train.shard_optimizer`) its
optimiser state in every process. Under `train.fsdp` each process keeps 1/N of every weight, gradient and
moment. Each transformer block is one unit: its weights are gathered from the processes for its forward,
and again for its backward, and freed after each. Its gradients are summed over the processes, and each
process keeps its own share of the sum (reduce-scatter). What lies outside the blocks (embeddings, final
norm, output layer, a value head) is the last unit, gathered for the whole forward and backward.

The sum is a plain sum, not FSDP's default mean: `fit()` divides each process's loss by the loss tokens of
the whole step over every process, as it does without sharding, so N processes with accumulation A train
as one process with accumulation N x A.

Trainable 16-bit weights train in float32 under `train.fsdp` (their shards are the master weights), so the
optimiser is torch's AdamW over DTensors. When `fit()` ends, `Sharded.gather` puts every weight back whole
into every process, into the very Parameter objects the model had, and takes FSDP off the model: the
recipe then saves, merges, evaluates and generates as in one process. The model must therefore fit whole
on one GPU for evaluation; what `train.fsdp` shards is training's memory (weights, gradients, moments).

Taking FSDP off a model has no public API in torch; `gather` undoes what `fully_shard` did (its hooks,
its class, its registry entries) for the torch this project pins, and its test checks that the model comes
back as it was.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tunesmith._core import dist
from tunesmith.config import TrainConfig
from tunesmith.models import speed

ROOT_CALL = "_tunesmith_root_call"  # the method `within_root` runs work through on a sharded model


def enabled(cfg: TrainConfig) -> bool:
    """Whether `fit()` shards this run: `train.fsdp` in a data-parallel run (in one process there is nothing
    to shard over)."""
    return bool(cfg.fsdp) and dist.world_size() > 1


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s weights are FSDP shards (between `shard` and `Sharded.gather`)."""
    return hasattr(model, ROOT_CALL)


def within_root(model: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """`fn()` (a loss function's forward), run as part of the model's own forward where the model is sharded:
    the weights outside the blocks are gathered while it runs and their gradients summed after backward,
    though it calls the decoder and reads the output layer's weight directly (a chunked loss), or calls
    the decoder and a score head (a reward model); plain `fn()` otherwise."""
    call = getattr(model, ROOT_CALL, None)
    return fn() if call is None else call(fn)


def _call(self: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    return fn()


@dataclass
class Sharded:
    """A model sharded by `shard`: what `gather` needs to put it back."""
    model: torch.nn.Module
    units: list[torch.nn.Module]
    # (module, name) -> the Parameter the model had there before sharding, its storage freed meanwhile
    originals: dict[tuple[int, str], torch.nn.Parameter] = field(default_factory=dict)

    def gather(self) -> None:
        """Every weight whole again in every process, in the Parameter objects the model had before `shard`
        (a tied weight stays one object), and FSDP taken off: hooks, classes, registry. Collective: every
        process calls it."""
        from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule, fully_shard

        DTensor = _dtensor()
        for unit in self.units:  # the last unit stays gathered after a forward: its shards back in their place
            unit.reshard()
        modules = list(self.model.modules())
        whole: dict[int, torch.Tensor] = {}
        for m in modules:  # the same order in every process: one all-gather per distinct weight
            for p in m._parameters.values():
                if isinstance(p, DTensor) and id(p) not in whole:
                    whole[id(p)] = p.full_tensor()
        for m in self.units:
            assert isinstance(m, FSDPModule)
            state = fully_shard.state(m)
            state._pre_forward_hook_handle.remove()
            state._post_forward_hook_handle.remove()
            for group in state._fsdp_param_groups:
                for handle in [*group._module_to_pre_save_state_dict_hook_handle.values(),
                               *group._module_to_pre_load_state_dict_hook_handle.values()]:
                    handle.remove()
            m.__class__ = next(c for c in type(m).__bases__ if c is not FSDPModule)
            states = m.__dict__.get(STATE_KEY, {})
            for key in [k for k in states if getattr(k, "__name__", "") == "fully_shard"]:
                del states[key]
            m.__dict__.get(REGISTRY_KEY, {}).pop("fully_shard", None)
            _module_state_mapping.pop(m, None)
        for m in modules:
            for name, p in list(m._parameters.items()):
                if isinstance(p, DTensor):
                    original = self.originals[(id(m), name)]
                    original.data = whole[id(p)]
                    m._parameters[name] = original
                else:
                    assert p is None or p is self.originals[(id(m), name)], f"{name}: not sharded, not restored"
        self.model.__dict__.pop(ROOT_CALL, None)


def shard(model: torch.nn.Module, device: torch.device) -> Sharded:
    """Shard `model` in place over the processes: each transformer block a unit, the rest the last one.
    Gradients are summed, not averaged (see the module's docstring). The whole weights the processes held
    are freed; `Sharded.gather` brings them back."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.world_size(),))
    originals = {(id(m), name): p for m in model.modules() for name, p in m._parameters.items() if p is not None}
    units = []
    for block in speed.decoder_layers(model):
        fully_shard(block, mesh=mesh)
        units.append(block)
    fully_shard(model, mesh=mesh)
    units.append(model)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one
    setattr(model, ROOT_CALL, types.MethodType(_call, model))
    register_fsdp_forward_method(model, ROOT_CALL)
    for p in {id(p): p for p in originals.values()}.values():  # their values live on in the shards
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return Sharded(model, units, originals)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's whole value (collective), any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, _dtensor()) else tensor


@torch.no_grad()
def copy_whole_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set `param` to the whole `value`: a sharded parameter takes this process's share of it."""
    if isinstance(param, _dtensor()):
        from torch.distributed.tensor import distribute_tensor

        local = param.to_local()
        share = distribute_tensor(value.to(local.device), param.device_mesh, param.placements, src_data_rank=None)
        local.copy_(share.to_local())
    else:
        param.copy_(value.to(param.device))


def local_state(state: Any) -> Any:
    """An optimiser's state dict with every sharded tensor as this process's plain share (what is saved)."""
    DTensor = _dtensor()
    if isinstance(state, DTensor):
        return state.to_local()
    if isinstance(state, dict):
        return {k: local_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [local_state(v) for v in state]
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict` of a `local_state`: each moment of a sharded parameter becomes a sharded
    tensor laid out as the parameter is."""
    optimizer.load_state_dict(state)
    DTensor = _dtensor()
    for p, moments in optimizer.state.items():
        if not isinstance(p, DTensor):
            continue
        for key, value in moments.items():
            if torch.is_tensor(value) and not isinstance(value, DTensor) and value.dim() > 0:
                moments[key] = DTensor.from_local(value.to(p.to_local().device), p.device_mesh, p.placements,
                                                  shape=p.shape, stride=p.stride())


def validation_forwards(n_rows: int, micro_batch_size: int) -> tuple[int, int]:
    """(micro-batches this process validates on, forwards it runs in step with the others): under FSDP
    every forward is a collective, so a process with fewer rows runs as many forwards as the one with the
    most (`_validate` discards the extra ones)."""
    world, me = dist.world_size(), dist.rank()
    mine = len(range(me, n_rows, world))
    return math.ceil(mine / micro_batch_size), math.ceil(math.ceil(n_rows / world) / micro_batch_size)
