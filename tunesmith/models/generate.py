"""The one generation engine, used by chat, `generate`, evaluation and RL rollouts.

Prompts arrive as token-id lists (rendered by `tunesmith.data.render_prompt`, so inference sees exactly
the prompts training saw). They are batched by length, left-padded with an attention mask (a decoder
continues from the last position, so padding must sit on the left), and decoded by HF `generate`.
Each result is cut at its first stop id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class Generation:
    """One completion: its new token ids and text without the stop token, and whether it stopped by itself."""

    token_ids: list[int]
    text: str
    finished: bool  # ended on a stop id within max_new_tokens (False: cut off by the budget)


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], *, stop_ids: list[int],
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int = 0, batch_size: int = 64) -> list[Generation]:
    """Complete every prompt; results come back in the order of `prompts`.

    Greedy when `temperature == 0`, else sampling with `temperature`, `top_p` and `top_k` (0 = no top-k).
    Sampling is reproducible for the same `seed`, prompts and `batch_size`, and leaves the caller's torch
    RNG state as it was. Works for plain HF models and PEFT models alike.
    """
    import torch

    _check_arguments(prompts, stop_ids, max_new_tokens, temperature, top_p, top_k, batch_size)
    options = _generation_options(tokenizer, stop_ids, max_new_tokens, temperature, top_p, top_k)
    device = next(model.parameters()).device
    # Sorting by length keeps padding (wasted compute) small inside each batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation] = []
    modes = {m: m.training for m in model.modules()}  # restored exactly, also for deliberately frozen parts
    # torch.manual_seed reseeds every GPU too, so every GPU's RNG state is saved and restored.
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                batch = [prompts[i] for i in order[start:start + batch_size]]
                results += _generate_batch(model, tokenizer, batch, options, set(stop_ids), device)
    finally:
        for module, training in modes.items():
            module.training = training
    by_prompt = dict(zip(order, results))
    return [by_prompt[i] for i in range(len(prompts))]


def _generate_batch(model: Any, tokenizer: Any, batch: list[list[int]], options: dict[str, Any],
                    stop: set[int], device: Any) -> list[Generation]:
    input_ids, attention_mask = left_pad(batch, options["pad_token_id"], device)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    return [_cut_at_stop(tokenizer, ids, stop) for ids in out[:, input_ids.shape[1]:].tolist()]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """(input_ids, attention_mask), both (B, T_max): each prompt right-aligned, mask 0 on the padding."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _generation_options(tokenizer: Any, stop_ids: list[int], max_new_tokens: int, temperature: float,
                        top_p: float, top_k: int) -> dict[str, Any]:
    # transformers fills every option we leave unset from the model's own generation_config (a checkpoint
    # may ship temperature, top_k=50 or a repetition penalty), so each sampling knob is set explicitly and
    # the result depends only on our arguments.
    pad = tokenizer.pad_token_id
    # Without a pad token any id will do: padded positions are masked out and cut after the stop id.
    pad = stop_ids[0] if pad is None else pad
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=list(stop_ids),
                                   pad_token_id=pad, num_beams=1, num_return_sequences=1, repetition_penalty=1.0,
                                   no_repeat_ngram_size=0, use_cache=True)
    if temperature == 0:
        # Greedy ignores the sampling knobs; setting them anyway makes transformers warn.
        return options | dict(do_sample=False)
    return options | dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)


def _cut_at_stop(tokenizer: Any, ids: list[int], stop: set[int]) -> Generation:
    # After a row stops, transformers keeps filling it with pad ids until the whole batch is done; cutting
    # at the first stop id drops those too. A row that never stopped used all max_new_tokens.
    end = next((j for j, t in enumerate(ids) if t in stop), None)
    kept = ids if end is None else ids[:end]
    return Generation(token_ids=kept, text=tokenizer.decode(kept, skip_special_tokens=True), finished=end is not None)


def _check_arguments(prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int, temperature: float,
                     top_p: float, top_k: int, batch_size: int) -> None:
    if not stop_ids:
        raise ValueError("stop_ids is empty: generation could never finish a turn")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be continued; render it with render_prompt first")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got {temperature}, {top_p}, {top_k}")
