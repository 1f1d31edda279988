"""Models: loading (default, tiny, HF folder, GGUF, run dirs), training-method selection, export.

Importing this package is cheap: torch and transformers load inside the functions that need them.
"""
from tunesmith.models.default import default_model_dir
from tunesmith.models.export import merge_adapter, save_final
from tunesmith.models.load import load_model_and_tokenizer, load_tokenizer, resolve_device
from tunesmith.models.methods import apply_method, count_parameters, describe_trainable
from tunesmith.models.tiny import tiny_model, tiny_tokenizer

__all__ = [
    "apply_method",
    "count_parameters",
    "default_model_dir",
    "describe_trainable",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "merge_adapter",
    "resolve_device",
    "save_final",
    "tiny_model",
    "tiny_tokenizer",
]
