"""Adapter stacking: a new adapter trained on top of an adapter model that stays as it is, frozen (a
pipeline's previous stage, say), while the base weights are never touched.

    StackedModel(below, method)    below: any adapter model (PEFT, bottleneck, virtual tokens, stacked)

The new adapter (lora, qlora, ia3 or bottleneck) goes into the transformers model at the bottom of the
stack, in place, under its own name (`stack1`, `stack2`, ... by depth), and the forward stays the one of
`below`, so a prefix or soft prompt beneath keeps working. Where two levels adapt the same linear layer,
PEFT runs both (its layers keep a list of active adapters; a different method wraps the layer again).

It has PEFT's surface:

- `disable_adapter()` switches off this level only: the outputs are those of the model the stage
  started from, which is what a DPO or RL reference means there;
- `save_pretrained` writes this level's tensors only (stacked_adapter.json and .safetensors); the
  final/ marker names the level below as its base_model, with "stacked": true;
- `from_pretrained(below, folder)` rebuilds it on the reloaded level below;
- `merge_and_unload()` folds every level into the base weights when each is a weight update (lora,
  dora, ia3) on unquantised weights.

DoRA is not stacked: its magnitude is measured against the base weight alone, so on top of another
adapter in the same layer it would not be a function of the model below.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from tunesmith._core.errors import TunesmithError
from tunesmith.config import STACKABLE_METHODS, MethodConfig
from tunesmith.models.bottleneck import (Bottleneck, insert_bottlenecks, read_adapter, switched_off,
                                         write_adapter)

CONFIG_FILE = "stacked_adapter.json"
WEIGHTS_FILE = "stacked_adapter.safetensors"


def _tuner_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _model_linear_names(base: torch.nn.Module) -> list[str]:
    """What `all-linear` means on a model that carries adapters: the names of the model's own linear
    layers (q_proj, ..., down_proj), not the linear layers inside adapters, nor the output layer."""
    inside = {id(base.get_output_embeddings())}
    for _, m in _tuner_layers(base):
        inside |= {id(x) for attr in m.adapter_layer_names for x in getattr(m, attr).modules()}
    for m in base.modules():
        if isinstance(m, Bottleneck):
            inside |= {id(x) for x in m.modules()}
    names = set()
    for n, m in base.named_modules():
        if id(m) in inside or not isinstance(m, torch.nn.Linear):  # bitsandbytes' layers are Linear too
            continue
        while n.endswith(".base_layer"):  # an adapted layer: the name is the wrapper's
            n = n.removesuffix(".base_layer")
        names.add(n.rsplit(".", 1)[-1])
    return sorted(names)


def _inject_peft(base: torch.nn.Module, method: MethodConfig, name: str) -> None:
    """Add a PEFT lora/ia3 adapter called `name` to `base` in place, leaving the adapters already there
    active (PEFT's injection would make `name` the only active one in every layer it knows)."""
    from peft import inject_adapter_in_model

    from tunesmith.models.methods import peft_tuner_config

    config = peft_tuner_config(method)
    if method.kind != "ia3" and method.lora.target_modules == "all-linear":
        config.target_modules = _model_linear_names(base)
    active = {id(m): list(m.active_adapters) for _, m in _tuner_layers(base)}
    below_configs = base.__dict__.get("peft_config")  # the record a PEFT model below keeps of its adapters
    with warnings.catch_warnings():  # "Already found a `peft_config` attribute": meant, and undone below
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(config, base, adapter_name=name)
    for _, m in _tuner_layers(base):
        names = active.get(id(m), []) + ([name] if name in m._all_available_adapter_names() else [])
        m.set_adapter(names)  # requires_grad is settled by StackedModel for every parameter
    if below_configs is None:
        del base.peft_config
    else:  # PEFT added this level to the same dict: the model below describes itself as before
        below_configs.pop(name, None)
        base.peft_config = below_configs


class StackedModel(torch.nn.Module):
    """`below` (frozen) with one more adapter trained on top; see the module doc."""

    def __init__(self, below: torch.nn.Module, method: MethodConfig):
        from tunesmith.models.methods import is_sequence_classifier

        super().__init__()
        if method.kind not in STACKABLE_METHODS:
            raise TunesmithError(f"method.kind={method.kind} cannot be stacked on another adapter (stackable: "
                                 f"{', '.join(STACKABLE_METHODS)}); start from it merged instead")
        self.below = below
        self.method = method
        self.depth = below.depth + 1 if isinstance(below, StackedModel) else 1
        self.adapter_name = f"stack{self.depth}"
        base = below.get_base_model()
        if is_sequence_classifier(base):
            raise TunesmithError("adapters stack on language models, not on a reward model or classifier")
        below.requires_grad_(False)
        known = {id(p) for p in base.parameters()}
        self._bottlenecks: list[Any] = []
        if method.kind == "bottleneck":
            self._bottlenecks = insert_bottlenecks(base, method.bottleneck)
        else:
            _inject_peft(base, method, self.adapter_name)
        self.own = [n for n, p in base.named_parameters() if id(p) not in known]
        if not self.own:
            raise TunesmithError(f"method.kind={method.kind} found no layer to adapt in the model below")
        own = set(self.own)
        for n, p in base.named_parameters():
            if n in own and p.dtype in (torch.float16, torch.bfloat16) and method.kind != "bottleneck":
                p.data = p.data.float()  # PEFT keeps adapter weights in fp32 on a 16-bit base (as get_peft_model)
            p.requires_grad_(n in own)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.below(*args, **kwargs)

    def get_base_model(self) -> torch.nn.Module:
        """The transformers model at the bottom of the stack (its layers carry every level's adapters)."""
        return self.below.get_base_model()

    @property
    def config(self) -> Any:
        return self.get_base_model().config

    def levels(self) -> list[Any]:
        """Every level from this one down to the first adapter model (not a StackedModel)."""
        levels, level = [], self
        while isinstance(level, StackedModel):
            levels.append(level)
            level = level.below
        return [*levels, level]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The outputs of the model below for the duration (this level switched off, the rest as they are)."""
        if self._bottlenecks:
            with switched_off(self._bottlenecks):
                yield
            return
        layers = [m for _, m in _tuner_layers(self.get_base_model()) if self.adapter_name in m.active_adapters]
        before = [list(m.active_adapters) for m in layers]
        for m, names in zip(layers, before):
            m._active_adapter = [n for n in names if n != self.adapter_name]  # set_adapter would touch grads
        try:
            yield
        finally:
            for m, names in zip(layers, before):
                m._active_adapter = names

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """This level's tensors, by their names in the transformers model."""
        params = dict(self.get_base_model().named_parameters())
        return {n: params[n].detach().cpu().contiguous() for n in self.own}

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """stacked_adapter.json (the method) and stacked_adapter.safetensors (this level's tensors)."""
        write_adapter(Path(folder), CONFIG_FILE, {"adapter_name": self.adapter_name,
                                                  "method": self.method.model_dump()},
                      WEIGHTS_FILE, self.adapter_state_dict())

    @classmethod
    def from_pretrained(cls, below: torch.nn.Module, folder: str | Path) -> "StackedModel":
        """The level saved in `folder`, rebuilt on `below`; every saved tensor must find its place."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text())
            method = MethodConfig.model_validate(meta["method"])
        except (OSError, ValueError, KeyError) as err:
            raise TunesmithError(f"{folder / CONFIG_FILE}: cannot read the stacked adapter config: {err}") from None
        stacked = cls(below, method)
        if stacked.adapter_name != meta["adapter_name"]:
            raise TunesmithError(f"{folder / CONFIG_FILE}: saved as {meta['adapter_name']} but the model below has "
                                 f"{stacked.depth - 1} stacked levels")
        read_adapter(folder / WEIGHTS_FILE, stacked.get_base_model(), stacked.own)
        return stacked

    def mergeable(self) -> bool:
        """Every level a weight update (lora, dora, ia3) on unquantised weights."""
        from tunesmith.models.methods import is_mergeable

        *stacked, first = self.levels()
        return all(s.method.kind in ("lora", "qlora", "ia3") for s in stacked) and is_mergeable(first)

    def merge_and_unload(self) -> torch.nn.Module:
        """The transformers model with every level's update folded into its weights (innermost first: a
        layer wrapped twice computes outer(inner(x)))."""
        if not self.mergeable():
            raise TunesmithError("this stack holds an adapter that is no weight update (bottleneck, prefix or "
                                 "prompt) or a quantised base, so it cannot be merged")
        base = self.get_base_model()
        layers = _tuner_layers(base)
        for _, m in sorted(layers, key=lambda nm: -nm[0].count(".")):
            present = [a for a in m.active_adapters if a in m._all_available_adapter_names()]
            if present:
                m.merge(adapter_names=present)
        names = {n for n, _ in layers}
        for n, m in layers:
            parent_name, _, attr = n.rpartition(".")
            if parent_name in names:  # inside another adapted layer: replaced with it
                continue
            setattr(base.get_submodule(parent_name) if parent_name else base, attr, m.get_base_layer())
        base.__dict__.pop("peft_config", None)
        return base

