"""Write a run's result to final/ (adapter or full model, tokenizer, model card, `tunesmith.json`), merge
adapters into plain HF folders, and export a model to GGUF, a merged HF folder or its PEFT adapter."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith._core.errors import TunesmithError
from tunesmith.config import ModelConfig, QuantConfig
from tunesmith.models.load import MARKER, load_model_and_tokenizer, resolve_source
from tunesmith.models.methods import adapter_start, is_adapter_model, is_quantised

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _recorded_base(base_model: str) -> str:
    # A path is made absolute so the final/ folder still finds its base from any working directory.
    return base_model if base_model in ("default", "tiny") else str(Path(base_model).expanduser().resolve())


def _base_in_run(base_model: str, out_dir: Path) -> str | None:
    """The base's path inside the innermost run directory holding both it and `out_dir` (a pipeline's stage
    on an earlier stage), so the result still finds its base once the run is moved or copied elsewhere."""
    if base_model in ("default", "tiny"):
        return None
    base = Path(base_model).expanduser().resolve()
    for root in Path(out_dir).resolve().parents:
        if (root / "status.json").is_file() and root in base.parents:
            return base.relative_to(root).as_posix()
    return None


def _tiny_seed(peft_model: Any) -> int:
    seed = getattr(peft_model.get_base_model().config, "tunesmith_tiny_seed", None)
    assert seed is not None, "a model built from `tiny` records tunesmith_tiny_seed in its config"
    return int(seed)


def _default_card(kind: str, base_model: str, method: str) -> str:
    what = "A PEFT adapter" if kind == "adapter" else "A full model"
    return (
        f"# tunesmith model\n\n{what} trained with tunesmith (method `{method}`) from base `{base_model}`.\n\n"
        "Load it with `tunesmith.models.load_model_and_tokenizer(ModelConfig(name=<this folder>))`.\n"
    )


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` onto `out_dir`; an older out_dir is moved aside first, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def save_final(
    model: Any,
    tokenizer: "PreTrainedTokenizerBase",
    out_dir: Path,
    *,
    base_model: str,
    method: str,
    card: str | None = None,
    base_seed: int | None = None,
    head: str = "lm",
    quant: QuantConfig | None = None,
    labels: list[str] | None = None,
) -> None:
    """Save an adapter (PeftModel) or full model, the tokenizer, `tunesmith.json` and README.md, atomically.

    `base_model` is the `ModelConfig.name` the run started from. An adapter on `tiny` also records the
    seed that built its base (read from the model; `base_seed`, if given, must agree), so loading
    rebuilds the identical base. A qlora adapter records `quant` (default 4-bit NF4), so loading quantises
    its base as training did. A classifier (`head="classify"`) records its class names in head order, so
    an adapter's base gets the same head back.
    """
    out_dir = Path(out_dir)
    kind = "adapter" if is_adapter_model(model) else "full"
    if kind == "full" and is_quantised(model):
        raise TunesmithError(f"cannot save a quantised model as {out_dir}; train it with an adapter method")
    marker: dict[str, Any] = {"kind": kind, "base_model": _recorded_base(base_model), "method": method,
                              "head": head}
    if (inside := _base_in_run(base_model, out_dir)) is not None:
        marker["base_in_run"] = inside
    if labels is not None:
        marker["labels"] = list(labels)
    if method == "qlora":
        marker["quant"] = (quant or QuantConfig()).model_dump()
    from tunesmith.models.stack import StackedModel  # torch only once a model is saved

    if isinstance(model, StackedModel):  # base_model is the adapter run it was trained on
        marker["stacked"] = True
    if base_model == "tiny" and kind == "adapter":
        marker["base_seed"] = _tiny_seed(model)
        assert base_seed is None or base_seed == marker["base_seed"], (base_seed, marker["base_seed"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        if kind == "adapter":
            # tunesmith never resizes the vocabulary, so the adapter alone is the whole difference; "auto"
            # would probe the base's name_or_path (maybe a deleted temp folder, or the Hub) to find out.
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
            if (start := adapter_start(model)) is not None:
                as_plain_lora(tmp, start)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        (tmp / "README.md").write_text(card if card is not None else _default_card(kind, marker["base_model"], method))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; final/ is meant to be shared
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def as_plain_lora(folder: Path, start: dict[str, Any]) -> None:
    """Rewrite the saved adapter in `folder`, one that started from the base's own directions (PiSSA, OLoRA:
    training ran on the residual base W - s B0 A0), as plain LoRA for the original base W: its update
    s (B A - B0 A0) is the rank-2r product s' [B, -B0] [A; A0], with the scale s' = s kept by doubling
    alpha (alpha / r; by sqrt 2 under rsLoRA, alpha / sqrt r). Weights other than LoRA's (a trained
    head) stay as they are. The result loads onto W with any LoRA loader, PEFT's included."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    for name, w in weights.items():
        if ".lora_A." in name:
            weights[name] = torch.cat([w, start[name].to(w.dtype)], dim=0)
        elif ".lora_B." in name:
            weights[name] = torch.cat([w, -start[name].to(w.dtype)], dim=1)
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(r=2 * config["r"], lora_alpha=config["lora_alpha"] * (2 ** 0.5 if config.get("use_rslora") else 2),
                  init_lora_weights=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_target(source: str | Path, out: str | Path, overwrite: bool) -> None:
    """Refuse, before anything loads, to write a result over something that exists (a run, a model, a
    file), unless `overwrite`; and always over the source, a folder that holds it or one inside it, which
    writing would delete."""
    out = Path(out).resolve()
    src = Path(str(source))
    if src.exists():
        src = src.resolve()
        what = ("is the source" if out == src else f"holds the source {source}" if out in src.parents
                else f"is inside the source {source}" if src in out.parents and out.exists() else None)
        if what:
            raise TunesmithError(f"{out} {what}: writing there would delete it; choose another path")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise TunesmithError(f"{out} already exists; choose another path, or pass --overwrite (overwrite=True) "
                             "to replace it")


def merge_adapter(source: str | Path, out_dir: Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Merge the adapter of a run dir / final dir into its (unquantised) base and save a plain HF folder.

    The merge itself runs in float32 (a bf16 merge would round the base and the update apart before adding
    them); the merged weights are then saved in `dtype`. A qlora adapter merges into the unquantised base,
    not into its 4-bit copy. An existing `out_dir` is refused unless `overwrite` (`check_target`).
    """
    import torch

    from tunesmith._core.precision import check_float16

    check_target(source, out_dir, overwrite)
    resolved = resolve_source(str(source))
    if resolved.kind != "adapter":
        raise TunesmithError(f"{source} holds no adapter to merge (expected a run or final/ folder of a LoRA run)")
    # for_training=True is the load path that merges an adapter into an unquantised base.
    model, tokenizer = load_model_and_tokenizer(
        ModelConfig(name=str(resolved.path), dtype="float32"), method="full", for_training=True
    )
    if dtype == "float16":
        check_float16(model.named_parameters(), f"merging {source} in float16",
                      "save it in bfloat16 or float32 (merge --dtype, or export hf-bf16 or hf-fp32)")
    model = model.to(getattr(torch, dtype))
    marker = resolved.marker
    assert marker is not None
    what = "adapter"
    while marker.get("stacked"):  # the base weights are those under the first adapter of the stack
        marker, what = resolve_source(marker["base_model"]).marker, "stack of adapters"
        assert marker is not None
    card = f"# tunesmith merged model\n\nThe {what} {resolved.path} merged into base `{marker['base_model']}`.\n"
    model.eval()
    # a reward or classifier head stays one, so the merged folder loads as what was trained
    save_final(model, tokenizer, Path(out_dir), base_model=marker["base_model"], method=marker["method"], card=card,
               head=marker.get("head", "lm"), labels=marker.get("labels"))
    return Path(out_dir)


EXPORT_FORMATS = ("gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-f32", "hf-fp32", "hf-bf16", "hf-fp16", "peft")
_HF_DTYPES = {"hf-fp32": "float32", "hf-bf16": "bfloat16", "hf-fp16": "float16"}


def _copy_peft_adapter(source: str | Path, out_dir: Path) -> Path:
    """An adapter run's final/ already is a PEFT folder (plus tokenizer, card and marker): copy it whole."""
    resolved = resolve_source(str(source))
    if resolved.kind == "adapter" and resolved.marker.get("stacked"):
        raise TunesmithError(f"{source} is an adapter stacked on another, not one PEFT adapter; export it merged "
                             "(hf-* or gguf-*)")
    if resolved.kind != "adapter" or not (resolved.path / "adapter_config.json").is_file():
        raise TunesmithError(f"{source} holds no PEFT adapter (expected a run or final/ folder of a LoRA-family "
                             "run); export a full model as gguf-* or hf-*")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        shutil.copytree(resolved.path, tmp, dirs_exist_ok=True)
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_model(source: str | Path, out: str | Path, *, format: str, overwrite: bool = False) -> Path:
    """Write `source` (anything `load_model_and_tokenizer` accepts) to `out` in one of EXPORT_FORMATS.

    gguf-*: one `.gguf` file, adapters merged first; hf-*: a plain HF folder (adapters merged, as
    `merge_adapter`); peft: the adapter of an adapter run alone. An existing `out` is refused unless
    `overwrite` (`check_target`).
    """
    out = Path(out)
    if format not in EXPORT_FORMATS:
        raise TunesmithError(f"export format '{format}' is not one of {list(EXPORT_FORMATS)}")
    check_target(source, out, overwrite)
    if format == "peft":
        return _copy_peft_adapter(source, out)
    if format.startswith("hf-"):
        dtype = _HF_DTYPES[format]
        resolved = resolve_source(str(source))
        if resolved.kind == "adapter":
            return merge_adapter(source, out, dtype=dtype, overwrite=overwrite)
        # float16 is loaded wide and checked first: a weight beyond its range would load as inf
        model, tokenizer = load_model_and_tokenizer(
            ModelConfig(name=str(source), dtype="float32" if dtype == "float16" else dtype), for_training=False)
        if dtype == "float16":
            from tunesmith._core.precision import check_float16

            check_float16(model.named_parameters(), f"exporting {source} as {format}",
                          "export it as hf-bf16 or hf-fp32")
            model = model.half()
        marker = resolved.marker or {}
        card = f"# tunesmith export\n\n`{source}` saved as a plain HF folder in {dtype}.\n"
        save_final(model, tokenizer, out, base_model=marker.get("base_model", str(source)),
                   method=marker.get("method", "none"), head=marker.get("head", "lm"), labels=marker.get("labels"),
                   card=card)
        return out
    from tunesmith.models.gguf import export_gguf

    if out.suffix != ".gguf":
        raise TunesmithError(f"{out}: a GGUF export is one file; give a path ending in .gguf")
    # for_training=True is the load path that merges an adapter into its unquantised base.
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=str(source)), method="full", for_training=True)
    model.eval()
    return export_gguf(model, tokenizer, out, dtype=format.removeprefix("gguf-"))
