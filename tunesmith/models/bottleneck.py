"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): a small
residual MLP on the output of a block's attention and/or MLP sub-layer, before the residual add,

    h' = h + scale * up(act(down(h)))        down: (H -> size), up: (size -> H), up starts at zero

so the adapted model starts out equal to its base. PEFT has no such method and the maintained library
that has one pins an older transformers, so it lives here, with PEFT's surface: `save_pretrained`,
`from_pretrained`, `disable_adapter()`, `get_base_model()` and `unload()`. It cannot be merged into the
base weights: the nonlinearity makes it no weight delta.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from tunesmith._core.errors import TunesmithError
from tunesmith.config import BottleneckConfig

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_model.safetensors"
_ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}
_SUBLAYERS = {"attention": "self_attn", "mlp": "mlp"}  # the Llama-family names of a block's sub-layers


class Bottleneck(torch.nn.Module):
    """down -> act -> up, added to the sub-layer's output. Its weights are float32 whatever the base's dtype
    (as PEFT keeps LoRA's on a 16-bit base), so AdamW's small updates are not rounded away; it reads the
    sub-layer's output in float32 and adds its own in the output's dtype."""

    def __init__(self, hidden: int, cfg: BottleneckConfig, device: torch.device):
        super().__init__()
        self.down = torch.nn.Linear(hidden, cfg.size, device=device)
        self.act = _ACTIVATIONS[cfg.activation]()
        self.up = torch.nn.Linear(cfg.size, hidden, device=device)
        self.scale = cfg.scale
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + (self.scale * self.up(self.act(self.down(h.to(self.down.weight.dtype))))).to(h.dtype)


class AdaptedSublayer(torch.nn.Module):
    """A sub-layer followed by its adapter; attention returns (output, weights), and only output is adapted."""

    def __init__(self, base_layer: torch.nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.enabled = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if not self.enabled:
            return out
        if isinstance(out, tuple):
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


@contextlib.contextmanager
def switched_off(sublayers: list[AdaptedSublayer]) -> Iterator[None]:
    """These adapters pass their sub-layer's output through unchanged for the duration."""
    for s in sublayers:
        s.enabled = False
    try:
        yield
    finally:
        for s in sublayers:
            s.enabled = True


def insert_bottlenecks(model: torch.nn.Module, cfg: BottleneckConfig) -> list[AdaptedSublayer]:
    """Wrap the configured sub-layers of every block of `model` (a transformers model) in place; the new
    adapters, in block order. A sub-layer that already carries adapters is wrapped again (stacking)."""
    param = next(model.parameters())
    added = []
    for block in model.model.layers:
        for where in cfg.after:
            name = _SUBLAYERS[where]
            adapted = AdaptedSublayer(getattr(block, name),
                                      Bottleneck(model.config.hidden_size, cfg, param.device))
            setattr(block, name, adapted)
            added.append(adapted)
    return added


def write_adapter(folder: Path, config_file: str, config: dict[str, Any], weights_file: str,
                  tensors: dict[str, torch.Tensor]) -> None:
    """An adapter of our own on disk: its settings as JSON and its tensors as safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / config_file).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / weights_file))


def read_adapter(weights: Path, model: torch.nn.Module, expected: Iterable[str]) -> None:
    """Copy the tensors saved in `weights` into `model`'s parameters of the same names; the saved names
    must be exactly `expected` (the adapter as rebuilt), or the file belongs to another model."""
    from safetensors.torch import load_file

    saved, expected = load_file(str(weights)), set(expected)
    if set(saved) != expected:
        raise TunesmithError(f"{weights}: adapter tensors do not fit this model "
                             f"(missing {sorted(expected - set(saved))[:3]}, "
                             f"unexpected {sorted(set(saved) - expected)[:3]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


class BottleneckModel(torch.nn.Module):
    """A causal LM (or sequence classifier) with bottleneck adapters; only the adapters train."""

    def __init__(self, model: torch.nn.Module, cfg: BottleneckConfig):
        super().__init__()
        self.base_model = model
        self.bottleneck_config = cfg
        model.requires_grad_(False)
        insert_bottlenecks(model, cfg)
        if hasattr(model, "score"):  # a new classification head trains with the adapters
            model.score.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> torch.nn.Module:
        """The wrapped transformers model (its sub-layers carry the adapters)."""
        return self.base_model

    @property
    def config(self) -> Any:
        return self.base_model.config

    def _sublayers(self) -> list[AdaptedSublayer]:
        return [m for m in self.base_model.modules() if isinstance(m, AdaptedSublayer)]

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """The base model's outputs for the duration (as a reference model), adapters kept."""
        return switched_off(self._sublayers())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors: the adapters, and a classification head if there is one."""
        return {n: p.detach().cpu().contiguous() for n, p in self.base_model.named_parameters()
                if ".adapter." in n or n.startswith("score.")}

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """bottleneck_config.json and bottleneck_model.safetensors (the adapters only)."""
        write_adapter(Path(folder), CONFIG_FILE, self.bottleneck_config.model_dump(), WEIGHTS_FILE,
                      self.adapter_state_dict())

    @classmethod
    def from_pretrained(cls, model: torch.nn.Module, folder: str | Path) -> "BottleneckModel":
        """`model` with the adapters saved in `folder`; every saved tensor must find its place."""
        folder = Path(folder)
        try:
            cfg = BottleneckConfig.model_validate_json((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError) as err:
            raise TunesmithError(f"{folder / CONFIG_FILE}: cannot read the bottleneck adapter config: {err}") from None
        wrapped = cls(model, cfg)
        read_adapter(folder / WEIGHTS_FILE, wrapped.base_model, wrapped.adapter_state_dict().keys())
        return wrapped

    def unload(self) -> torch.nn.Module:
        """The base model with the adapters removed (not merged: they are no weight delta)."""
        for block in self.base_model.model.layers:
            for name in _SUBLAYERS.values():
                sub = getattr(block, name)
                if isinstance(sub, AdaptedSublayer):
                    setattr(block, name, sub.base_layer)
        return self.base_model
