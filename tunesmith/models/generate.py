"""The one generation engine, used by chat, `generate`, evaluation and RL rollouts.

Prompts arrive as token-id lists (rendered by `tunesmith.data.render_prompt`, so inference sees exactly
the prompts training saw). They are batched by length and left-padded with an attention mask (a decoder
continues from the last position, so padding must sit on the left). Decoding is our own loop over the
model's KV cache: one prefill forward that keeps only the last position's logits, then one forward per
new token. Rows with the same prompt (an RL group's samples) share one prefill: the prompt's keys and
values are computed once and copied to each of its rows. Owning the loop is what lets every token come
back with its log-probability (RL needs them), sampling draw from a private seeded generator (the
caller's RNG is never touched), and rows stop on stop ids or stop strings.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from tunesmith._core.batches import in_batches
from tunesmith._core.errors import TunesmithError
from tunesmith._core.modes import evaluating
from tunesmith.models.methods import has_virtual_tokens, is_sequence_classifier

# A generation changes what it runs on for its duration: the model's mode and attention, its LoRA layers, and
# Liger's kernels in the architecture's transformers module (every model of that architecture). Generations in
# one process therefore take turns, whichever models they run (re-entrant: a generation may start another).
_TURNS = threading.RLock()


@dataclass
class Generation:
    """One completion: its new token ids and text without the stop token, and whether it stopped by itself.

    `logprobs[i]` is log p(token_ids[i]) under the distribution the engine sampled from before top-k/top-p
    truncation: softmax(logits / temperature), or softmax(logits) when greedy. That is the distribution a
    training forward can reproduce, which RL's importance ratios need.
    """

    token_ids: list[int]
    text: str
    finished: bool  # ended on a stop id or stop string within max_new_tokens (False: cut off by the budget)
    logprobs: list[float] = field(default_factory=list)
    stop_id: int | None = None  # the stop id that ended it (RL trains on it: a turn must learn to end)


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], *, stop_ids: list[int],
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int = 0, batch_size: int = 64, stop_strings: Sequence[str] = (),
             kernels: bool | None = None) -> list[Generation]:
    """Complete every prompt; results come back in the order of `prompts`.

    Greedy when `temperature == 0`, else sampling with `temperature`, `top_p` and `top_k` (0 = no top-k).
    Sampling is reproducible for the same `seed`, prompts and `batch_size`, and leaves the caller's torch
    RNG state as it was. A completion ends at its first stop id (dropped) or at the end of the first of
    `stop_strings` it contains (the text is cut there, the string kept out). Works for plain HF models
    and PEFT models alike. A batch that runs out of GPU memory runs again in halves (`in_batches`).

    `kernels` (default: on CUDA) runs the fused layers training uses (`_decode_kernels`), fewer kernels for
    each decode step to run. They are put in place for the call and taken off after it, so calls from
    several threads take turns (one generation at a time in a process).
    """
    import torch

    _check_arguments(prompts, stop_ids, max_new_tokens, temperature, top_p, top_k, batch_size)
    if is_sequence_classifier(model):
        raise TunesmithError("this model is a reward model or classifier (a score head, no language-model head): "
                             "it scores text and cannot generate; score with `tunesmith score` or tunesmith.load")
    text_config = getattr(model.config, "get_text_config", lambda: model.config)()
    context = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if context and prompts and (longest := max(map(len, prompts))) > context:
        raise TunesmithError(f"a prompt of {longest} tokens is longer than the model's context of {context} "
                             "positions: shorten it")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    # Without a pad token any id will do: padded positions are masked out and dropped after the stop.
    pad = stop_ids[0] if pad is None else pad
    # Sorting by length keeps padding (wasted compute) small inside each batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation] = []
    generator = torch.Generator(device=device).manual_seed(seed)
    sampler = _Sampler(temperature, top_p, top_k, generator)

    def run(start: int, stop: int) -> list[Generation]:
        batch = [prompts[i] for i in order[start:stop]]
        # the static cache has no room for virtual tokens; their models decode with the dynamic one
        static = (device.type == "cuda" and not has_virtual_tokens(model)
                  and static_decoding_fits(model.config, max(map(len, batch)) + max_new_tokens))
        decode = _decode_static if static else _decode
        ids, logps, finished = decode(model, batch, pad, stop_ids, max_new_tokens, sampler, device)
        return [_result(tokenizer, t, lp, f, set(stop_ids), stop_strings) for t, lp, f in zip(ids, logps, finished)]

    # GQA decode steps read the KV cache once per key/value head (grouped_decode_attention)
    with _TURNS, evaluating(model), torch.inference_mode(), _grouped_decode(model), \
            _decode_kernels(model, device.type == "cuda" if kernels is None else kernels):
        for part in in_batches(len(order), batch_size, run, "generation"):
            results += part
    by_prompt = dict(zip(order, results))
    return [by_prompt[i] for i in range(len(prompts))]


@contextlib.contextmanager
def _decode_kernels(model: Any, on: bool) -> Any:
    """For the duration of a generation, when `on`: a PEFT model's LoRA layers through the fused layers
    (`models.fused`), which per decode step read a block's q/k/v input once for their adapters and add
    each adapter's product inside its base layer's GEMM, with the adapters cast to the compute dtype once
    per generation (PEFT's layers launch about seven kernels each: 1,452 operators a decode step on the
    1B shape become 956, `python -m benchmarks.launches decode`); and on CUDA, Liger's RMSNorm, RoPE and
    SwiGLU where liger-kernel is installed (one kernel each where PyTorch's operators launch about eight
    for a norm). A decode step at batch 64 is short enough that the count of small kernels, each a few
    microseconds on the GPU even inside a CUDA graph, is a large part of it. Layers the fused ones do not
    cover (DoRA, quantised bases, adapters switched off) keep PEFT's forward."""
    from tunesmith.models import speed
    from tunesmith.models.fused import fused_for_inference

    undo = speed.apply_liger(model) if on else None  # None off CUDA or without liger-kernel
    try:
        with fused_for_inference(model, on):
            yield
    finally:
        if undo is not None:
            undo()


class _Sampler:
    """Next-token choice from last-position logits: (tokens (B,), their log-probs (B,))."""

    def __init__(self, temperature: float, top_p: float, top_k: int, generator: Any):
        self.temperature, self.top_p, self.top_k, self.generator = temperature, top_p, top_k, generator

    def __call__(self, logits: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        logits = logits.float()
        if self.temperature == 0:
            tokens = logits.argmax(-1)
            return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        scaled = logits / self.temperature
        logps = torch.log_softmax(scaled, -1)
        kept = scaled
        if self.top_k:
            kth = torch.topk(kept, min(self.top_k, kept.shape[-1]), dim=-1).values[:, -1:]
            kept = kept.masked_fill(kept < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, idx = kept.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # Drop a token when the tokens ranked above it already reach top_p; the first is always kept.
            drop_sorted = probs.cumsum(-1) - probs >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
            kept = kept.masked_fill(drop, float("-inf"))
        tokens = draw(logps.exp() if kept is scaled else kept.softmax(-1), self.generator)
        return tokens, logps.gather(-1, tokens[:, None]).squeeze(-1)


def draw(probs: "torch.Tensor", generator: Any = None) -> "torch.Tensor":
    """One index per row of `probs` (B, V), drawn with probability proportional to its entry: one uniform
    number per row against the row's running sums, the first entry whose sum exceeds it. Entries of
    probability 0 are never drawn. torch.multinomial draws an exponential number for every entry instead:
    on a CPU, 37 to 52 ms a decode step for 32 rows of a 49,152-word vocabulary, where this takes 1 ms
    (`python -m benchmarks.sampling`).

    The sums are accumulated in float64, so that a large vocabulary's least likely entries keep their
    share: on CUDA they are float64 sums (its float32 cumsum adds in float32); a CPU's float32 cumsum adds
    in float64 already, and float64 sums there took up to 14 ms, mostly in fresh memory for them."""
    import torch

    dtype = torch.float64 if probs.device.type == "cuda" else torch.float32
    sums = probs.cumsum(-1, dtype=dtype)
    u = torch.rand((sums.shape[0], 1), generator=generator, device=sums.device, dtype=dtype)
    picked = torch.searchsorted(sums, u * sums[:, -1:], right=True)
    return picked.clamp_(max=sums.shape[-1] - 1).squeeze(-1)  # in range even for a row of NaN


def _decode(model: Any, batch: list[list[int]], pad: int, stop_ids: list[int], max_new_tokens: int,
            sampler: _Sampler, device: Any) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """Decode one left-padded batch with the KV cache; returns per row the new ids (up to and including
    the stop id), their log-probs, and whether the row stopped."""
    import torch

    distinct, rows = _distinct(batch, device)
    input_ids, mask = left_pad(distinct, pad, device)
    # Positions count real tokens only, so a left-padded prompt sees the positions it would see alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    if rows is not None:  # each row from its prompt's prefill
        cache.reorder_cache(rows)
        mask, positions, logits = (t.index_select(0, rows) for t in (mask, positions, logits))
    next_pos = positions[:, -1:] + 1
    steps = _Steps(len(batch), max_new_tokens, pad, stop_ids, device)
    tokens = steps.take(sampler, logits)
    taken = 1
    while taken < max_new_tokens and not steps.all_done(taken):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
        tokens = steps.take(sampler, out.logits[:, -1])
        taken += 1
    return steps.rows(taken)


def _distinct(batch: list[list[int]], device: Any) -> tuple[list[list[int]], Any]:
    """The batch's distinct prompts, in order of first appearance, and for each row the index of its prompt
    among them (a tensor on `device`; None when every prompt is distinct). The prefill runs over the distinct
    prompts only and its cache is copied out to the rows (`Cache.reorder_cache`): a prompt's keys and values
    do not depend on what is sampled after it, so an RL group of G samples pays for its prompt once, not G
    times. Every row still draws its own tokens, from the same logits."""
    import torch

    first: dict[tuple[int, ...], int] = {}
    index = [first.setdefault(tuple(p), len(first)) for p in batch]
    if len(first) == len(batch):
        return batch, None
    return [list(p) for p in first], torch.tensor(index, dtype=torch.long, device=device)


class _Steps:
    """What each decode step chose, written on the device into buffers of `max_new_tokens` columns: the
    tokens, their log-probs, and which rows stopped there. Nothing in `take` reads a value back to the host,
    so a CUDA graph can capture it with the forward. Whether every row has stopped is asked of the device
    only every `check_every` steps: each question waits for the GPU, and a few extra steps of padding cost
    less than a wait per token."""

    def __init__(self, n: int, max_new_tokens: int, pad: int, stop_ids: list[int], device: Any,
                 check_every: int = 1):
        import torch

        self.pad, self.check_every = pad, check_every
        self.stop = torch.tensor(stop_ids, device=device)
        self.done = torch.zeros(n, dtype=torch.bool, device=device)
        self.ids = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
        self.logps = torch.zeros(n, max_new_tokens, dtype=torch.float32, device=device)
        self.hits = torch.zeros(n, max_new_tokens, dtype=torch.bool, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)  # where the next token goes

    def take(self, sampler: _Sampler, logits: "torch.Tensor") -> "torch.Tensor":
        tokens, logps = sampler(logits)
        tokens = tokens.masked_fill(self.done, self.pad)  # rows already stopped only carry padding from here on
        hit = (tokens[:, None] == self.stop).any(-1) & ~self.done
        self.ids.index_copy_(1, self.column, tokens[:, None])
        self.logps.index_copy_(1, self.column, logps[:, None].float())
        self.hits.index_copy_(1, self.column, hit[:, None])
        self.done |= hit
        self.column += 1
        return tokens

    def all_done(self, taken: int) -> bool:
        return taken % self.check_every == 0 and bool(self.done.all())

    def rows(self, taken: int) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        """Per row: ids up to and including the stop id, their log-probs, and whether it stopped."""
        ids, logps, hits = (x[:, :taken].tolist() for x in (self.ids, self.logps, self.hits))
        rows = []
        for row_ids, row_logps, row_hits in zip(ids, logps, hits):
            end = row_hits.index(True) + 1 if True in row_hits else len(row_ids)
            rows.append((row_ids[:end], row_logps[:end], True in row_hits))
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def static_decoding_fits(config: Any, total: int) -> bool:
    """Whether `_decode_static` serves a model of this config for `total` positions (prompt and new
    tokens). Not when a sliding-window layer's cache would be shorter than `total` (the step's mask spans
    every position), nor with a dynamic RoPE scaling (it compares the longest position with the cached
    length on the host, which a CUDA graph cannot capture)."""
    from tunesmith.models.speed import sliding_window

    window = sliding_window(config)
    if window is not None and total > window:
        return False
    config = getattr(config, "get_text_config", lambda: config)()
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kinds = [rope.get("rope_type", rope.get("type", ""))] if isinstance(rope, dict) else []
    if isinstance(rope, dict):  # per-layer-type parameters: {"full_attention": {...}, ...}
        kinds += [v.get("rope_type", "") for v in rope.values() if isinstance(v, dict)]
    return not any("dynamic" in str(k) for k in kinds)


DECODE = "tunesmith_grouped_decode"
# How many of a static cache's columns the current decode step attends over (None: all of them).
_COLUMNS: contextvars.ContextVar[int | None] = contextvars.ContextVar("tunesmith_decode_columns", default=None)


@contextlib.contextmanager
def _attending_over(columns: int) -> Any:
    token = _COLUMNS.set(columns)
    try:
        yield
    finally:
        _COLUMNS.reset(token)


def column_bucket(total: int) -> int:
    """How many cache columns a static decode step's extent grows by: a multiple of 64, with at most about
    8 extents (so at most about 8 captured graphs) over `total` positions."""
    return 64 * max(1, -(-total // 512))


def grouped_decode_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Any, None]:
    """transformers attention interface for generation. A decode step (one query per row) attends with the
    query heads of each key/value head as one group, (B, Hkv, G, D) against (B, Hkv, T, D), so the cache is
    read once per key/value head: transformers' SDPA path with a mask copies the keys and values out to
    every query head first (`repeat_kv`), which at batch 64 moves more bytes than the weights. Any other
    call (the prefill) is transformers' SDPA attention."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, dim = query.shape
    columns = _COLUMNS.get()
    if q_len == 1 and columns is not None and columns < key.shape[2]:
        # a static cache's columns from `columns` on are all masked out at this step: not read at all
        key, value = key[:, :, :columns], value[:, :, :columns]
        attention_mask = None if attention_mask is None else attention_mask[..., :columns]
    groups = heads // key.shape[1]
    shared_mask = attention_mask is None or (attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1)
    if q_len != 1 or groups == 1 or dropout or not shared_mask or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # query head j * G + g reads key/value head j (transformers' repeat_kv order)
    out = F.scaled_dot_product_attention(query.reshape(b, heads // groups, groups, dim), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, dim).transpose(1, 2), None


def _grouped_decode(model: Any) -> Any:
    """`DECODE` in place of SDPA attention for the duration of a generation (other implementations stay)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    from tunesmith.models import speed

    AttentionInterface.register(DECODE, grouped_decode_attention)
    AttentionMaskInterface.register(DECODE, sdpa_mask)
    return speed.attention_implementation(model, DECODE, replaces={"sdpa"})


def _static_cache(model: Any, max_len: int) -> Any:
    from transformers import StaticCache
    return StaticCache(config=model.config, max_cache_len=max_len)


def _capture(feed: Any, choose: Any, sampler: _Sampler, pool: Any = None) -> Any:
    """Capture one decode step (`choose(feed())`) as a CUDA graph; returns the function that replays it.
    The draw goes inside the graph when it can: greedy always, a seeded draw where torch lets a graph
    advance that generator at every replay; otherwise it runs eagerly after each replay. Graphs of one
    generation share their memory `pool`: each is replayed only until the next is captured."""
    import torch

    g = torch.cuda.CUDAGraph()
    inside = sampler.temperature == 0
    if not inside:
        try:
            g.register_generator_state(sampler.generator)
            inside = True
        except (AttributeError, RuntimeError, TypeError):
            pass
    with torch.cuda.graph(g, pool=pool):
        out = feed()
        if inside:
            choose(out)

    def replay() -> None:
        g.replay()
        if not inside:
            choose(out)
    replay.draws_inside = inside
    replay.pool = g.pool()
    return replay


def _decode_static(model: Any, batch: list[list[int]], pad: int, stop_ids: list[int], max_new_tokens: int,
                   sampler: _Sampler, device: Any, graph: bool | None = None,
                   check_every: int = 8, bucket: int | None = None) -> tuple[list, list, list]:
    """`_decode` with a static KV cache and explicit boolean masks, so every decode step has the same
    shapes and addresses. On CUDA the whole step after the first (the forward, the draw, the stop check
    and the next step's inputs, all on the device) is captured as a CUDA graph and replayed, with no
    Python or launch overhead per token; the host waits for the device only every `check_every` tokens.
    Where the capture fails, the call warns and decodes the rest eagerly. Same tokens and log-probs as
    `_decode`.

    A step attends over the cache's first columns only, up to the next multiple of `bucket` (default
    `column_bucket`) past the token it feeds, not over all of them: the rest are masked out, and reading
    them would cost as many bytes as the weights once the cache is long and the batch large. So there is
    one graph per such extent, captured when the decode first reaches it."""
    import torch

    graph = device.type == "cuda" if graph is None else graph
    distinct, rows = _distinct(batch, device)
    input_ids, mask = left_pad(distinct, pad, device)
    p = input_ids.shape[1]
    total = p + max_new_tokens
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    real = torch.zeros(len(distinct), total, dtype=torch.bool, device=device)
    real[:, :p] = mask.bool()
    # Prefill: causal over the prompt and blind to padding; a padding query sees itself, so no row is empty.
    causal = torch.ones(p, total, dtype=torch.bool, device=device).tril()
    allowed = causal[None] & real[:, None, :]
    allowed |= torch.eye(p, total, dtype=torch.bool, device=device)[None]
    cache = _static_cache(model, total)
    logits = model(input_ids=input_ids, attention_mask=allowed[:, None], position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    if rows is not None:  # each row from its prompt's prefill (the cache's tensors are made anew, before any capture)
        cache.reorder_cache(rows)
        positions, real, logits = (t.index_select(0, rows) for t in (positions, real, logits))
    steps = _Steps(len(batch), max_new_tokens, pad, stop_ids, device, check_every)
    step_ids = steps.take(sampler, logits)[:, None].clone()  # the token each row feeds next
    step_pos = positions[:, -1:] + 1
    step_mask = real[:, None, None, :].clone()  # (B, 1, 1, total): what the fed token may attend to
    fed = torch.full((1,), p, dtype=torch.long, device=device)  # the cache column the fed token fills

    def feed() -> "torch.Tensor":
        step_mask.index_fill_(3, fed, True)
        out = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos,
                    past_key_values=cache, use_cache=True).logits[:, -1]
        fed.add_(1)
        step_pos.add_(1)
        return out

    def choose(out: "torch.Tensor") -> None:
        step_ids.copy_(steps.take(sampler, out)[:, None])

    bucket = bucket or column_bucket(total)
    replay, pool, extent, taken = None, None, 0, 1
    while taken < max_new_tokens and not steps.all_done(taken):
        # this step's token goes to column p + taken - 1 and attends to every column up to it
        if p + taken > extent:
            extent, replay = min(total, bucket * -(-(p + taken) // bucket)), None
        with _attending_over(extent):
            if replay is None and graph and taken > 1:  # the first step ran eagerly: lazy set-up stays out
                try:
                    replay = _capture(feed, choose, sampler, pool=pool)  # runs nothing: the replay below is this step
                    pool = getattr(replay, "pool", None)
                except RuntimeError as err:
                    # An operation the graph cannot hold (a host read, an unsupported kernel): the capture ran
                    # nothing and every buffer above is on the device, so the loop goes on eagerly from here.
                    warnings.warn(f"decoding without a CUDA graph: capturing the decode step failed ({err})",
                                  RuntimeWarning, stacklevel=2)
                    graph = False
            if replay is not None:
                replay()
            else:
                choose(feed())
        taken += 1
    return steps.rows(taken)


def _result(tokenizer: Any, ids: list[int], logps: list[float], finished: bool, stop: set[int],
            stop_strings: Sequence[str]) -> Generation:
    stop_id = None
    if finished and ids and ids[-1] in stop:
        ids, logps, stop_id = ids[:-1], logps[:-1], ids[-1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    if cuts:
        # Keep the tokens up to the one that completes the stop string; their text is cut at the string.
        text = text[:min(cuts)]
        n = next(k for k in range(1, len(ids) + 1) if any(s and s in tokenizer.decode(ids[:k], skip_special_tokens=True)
                                                           for s in stop_strings))
        # the stop id, if any, came after the string: not this completion's end
        ids, logps, finished, stop_id = ids[:n], logps[:n], True, None
    return Generation(token_ids=ids, text=text, finished=finished, logprobs=logps, stop_id=stop_id)


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


def _check_arguments(prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int, temperature: float,
                     top_p: float, top_k: int, batch_size: int) -> None:
    if not stop_ids:
        raise ValueError("stop_ids is empty: generation could never finish a turn")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be continued; render it with render_prompt first")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if not (temperature == 0 or 1e-6 <= temperature < float("inf")) or not 0 < top_p <= 1 or top_k < 0:
        # below 1e-6, logits / temperature overflow to inf, and every probability to nan
        raise ValueError(f"need temperature 0 (greedy) or from 1e-6 up, 0 < top_p <= 1 and top_k >= 0; got "
                         f"{temperature}, {top_p}, {top_k}")
