"""The speed settings of a training run (`train.attention`, `train.loss_chunking`, `train.checkpointing`,
`train.compile`, `train.offload_activations`, `train.memory_budget_gib`): what `auto` resolves to on this
device for this model, applied to the model and reported in the run's events."""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from tunesmith._core.errors import TunesmithError
from tunesmith._core.modes import evaluating
from tunesmith._core.rundir import RunDir
from tunesmith.config import TrainConfig
from tunesmith.data.packing import Example, collate, collate_flat
from tunesmith.models import fused, speed
from tunesmith.models.methods import has_virtual_tokens
from tunesmith.training.precision import AUTOCAST, autocast_to, resolve_precision

T = TypeVar("T")


@dataclass
class SpeedPlan:
    varlen: bool                               # flat micro-batches, variable-length attention
    chunked_loss: bool                         # cross-entropy from hidden states, in chunks
    checkpointing: str                         # "off", "all", "budget" or "fixed"
    fixed_layers: int                          # blocks checkpointed when "fixed" / "all"
    budget: speed.CheckpointBudget | None      # per-micro-batch choice when "budget"
    compile: bool
    offload: bool
    fused: bool                                # fused LoRA layers (+ Liger kernels on CUDA)
    kernel: str                                # which attention kernel a flat batch runs
    mlp_chunk: int | None = None               # MLPs run this many tokens at a time (recomputed in backward)
    autocast: torch.dtype | None = None        # what training's forward computes in (train.precision)
    liger: bool = False                        # set once Liger's kernels are applied
    undo_liger: Callable[[], None] | None = None  # puts back what Liger's kernels replaced
    last_tokens: int | None = None             # the size of the micro-batch last set up (before_forward)
    compile_error: str | None = None           # why compiling the blocks failed (they then run eagerly)
    measure_error: str | None = None           # why measuring a block's activations failed (the formula counts)
    flat_reason: str | None = None             # why the rows run flat where the settings chose padded ones
    padded_reason: str | None = None           # why the rows run padded where the settings chose flat ones

    def layers_for(self, tokens: int) -> int:
        return self.plan_for(tokens)[0]

    def plan_for(self, tokens: int) -> tuple[int, int]:
        """(checkpointed blocks, blocks recomputing their MLP's product) for a micro-batch of `tokens`."""
        if self.checkpointing == "budget":
            return self.budget.plan_for(tokens)
        return self.fixed_layers, 0

    def describe(self, tokens: Sequence[int] = ()) -> str:
        if self.varlen:
            attention = f"padding-free varlen ({self.kernel}" + (f", {self.flat_reason})" if self.flat_reason else ")")
        else:
            attention = "padded rows" + (f" ({self.padded_reason})" if self.padded_reason else "")
        parts = [f"attention: {attention}",
                 f"loss: {'chunked cross-entropy (no full logits)' if self.chunked_loss else 'full logits'}"]
        if self.checkpointing == "budget":
            ks, ps = zip(*[self.plan_for(t) for t in tokens]) if tokens else ([0], [0])
            parts.append(f"checkpointing: {min(ks)}-{max(ks)} of {self.budget.blocks} blocks per micro-batch "
                         f"to fit {self.budget.budget / 2**30:.1f} GiB")
            if self.budget.products:
                parts.append(f"MLP products recomputed in backward: {min(ps)}-{max(ps)} of the other blocks")
            if self.budget.measured is not None:
                lean = (f" ({self.budget.measured_lean / 1024:.1f} and {self.budget.per_token_lean / 1024:.1f} "
                        "with the MLP's product recomputed)" if self.budget.measured_lean is not None else "")
                parts.append(f"activations {self.budget.measured / 1024:.1f} KiB per token per block measured, "
                             f"{self.budget.per_token / 1024:.1f} KiB counted{lean}")
            elif self.measure_error:
                parts.append(f"activations {self.budget.per_token / 1024:.1f} KiB per token per block estimated, "
                             f"not measured ({self.measure_error})")
            long = sum(self.budget.long_for(t) for t in tokens)
            if long:
                parts.append(f"long mode for {long} of {len(tokens)} micro-batches (block inputs in host memory, "
                             f"MLPs in chunks of {self.mlp_chunk or speed.LONG_MLP_CHUNK} tokens)")
        else:
            parts.append(f"checkpointing: {self.fixed_layers} blocks")
        failed = f" (compiling failed, so they run eagerly: {self.compile_error})" if self.compile_error else ""
        parts.append(f"compiled blocks: {'on' if self.compile else 'off'}{failed}")
        parts.append(f"fused kernels: {'on' if self.fused else 'off'}" + (" (Liger)" if self.liger else ""))
        if self.offload:
            parts.append("checkpointed blocks' inputs and other blocks' activations offloaded to host memory")
        if self.mlp_chunk:
            parts.append(f"MLPs in chunks of {self.mlp_chunk} tokens")
        return "; ".join(parts)


def chunked_loss(cfg: TrainConfig) -> bool:
    """Whether log-probs are computed from hidden states chunk by chunk, never as full logits: `on` or `auto`,
    on any device. On a CPU too it is the faster path: prompt positions skip the output layer, and no
    (tokens x vocab) float32 logits and gradient are written and read again. On SmolLM2-135M (49,152 words)
    with LoRA, 10 steps of the quickstart took 30 s instead of 37 s, full fine-tuning 6 steps 27 s instead
    of 32 s, and 6 steps over prose that trains every token 31 s instead of 34 s, the same losses to 1e-6
    (docs/performance.md)."""
    return cfg.loss_chunking in ("on", "auto")


def plan_speed(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, *, language_model: bool,
               shared_prefixes: bool = False, moment_share: float = 1.0) -> SpeedPlan:
    """Resolve `auto`: chunked loss (language-model losses only) on every device; on CUDA, varlen attention
    and checkpointing sized to the memory budget (which counts `moment_share` of the optimiser moments: a
    sharded optimiser's part); elsewhere padded rows (faster there than attention run
    per example), but flat rows where the caller's sequences share prefixes they lay out once
    (`shared_prefixes`: an RL group's samples of one prompt, a DPO prompt's answers), as skipping the
    repeats outweighs running attention per example."""
    cuda = device.type == "cuda"
    cfg = resolve_precision(cfg, model)[0]
    if language_model and cfg.attention == "varlen" and has_virtual_tokens(model):
        # a stack on prefix or prompt tuning: its config alone cannot tell
        raise TunesmithError("the model puts virtual tokens before each example (prefix or prompt tuning): "
                             "in a flat row only the first example would see them; set train.attention auto or "
                             "padded")
    half = cfg.precision in ("bf16", "fp16") or next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    # auto: the flash kernel runs 16-bit only; float32 without autocast keeps padded rows
    # auto: virtual tokens lead each padded row
    shared = shared_prefixes and not cuda and cfg.attention == "auto"
    varlen = language_model and not has_virtual_tokens(model) and (
        cfg.attention == "varlen" or (cfg.attention == "auto" and cuda and half) or shared)
    chunked = language_model and chunked_loss(cfg)
    n_blocks = len(speed.decoder_layers(model))
    mode, fixed, budget = "fixed", 0, None
    if cfg.checkpointing == "all":
        mode, fixed = "all", n_blocks
    elif isinstance(cfg.checkpointing, int):
        fixed = min(cfg.checkpointing, n_blocks)
    elif cfg.checkpointing == "auto" and (cuda or cfg.memory_budget_gib is not None):
        vocab = getattr(model, "get_base_model", lambda: model)().config.vocab_size
        mode = "budget"
        budget = speed.CheckpointBudget(model, speed.device_budget_bytes(device, cfg.memory_budget_gib),
                                        loss_bytes=3 * 2**29 if chunked else 0.0,
                                        loss_bytes_per_token=0.0 if chunked else 12.0 * vocab,
                                        offload=cfg.offload_activations, dtype_bytes=2 if half else 4,
                                        eight_bit_moments=cfg.optimizer.endswith("8bit"), moment_share=moment_share)
    kernel = speed.varlen_kernel(device) if half else None
    slow = speed.per_example_parts(model, kernel)
    kernel = (f"{kernel}; per example for {slow}" if slow else kernel) if kernel else "SDPA per example"
    fused = cfg.kernels == "on" or (cfg.kernels == "auto" and cuda)
    return SpeedPlan(varlen, chunked, mode, fixed, budget, cfg.compile, cfg.offload_activations, fused, kernel,
                     cfg.mlp_chunk_tokens, AUTOCAST.get(cfg.precision),
                     flat_reason="each prompt laid out once" if varlen and shared else None)


def keeps_examples_apart(model: torch.nn.Module, *, flat: bool, autocast: torch.dtype | None = None) -> bool:
    """Whether two examples in one row stay apart in this model's attention: in a flat row (`flat`, the model
    in `speed.varlen_attention`, whose implementation its attention must call: Falcon's and MPT's do not), or
    in a padded row whose position ids restart at each example (transformers' packed-sequence detection, which
    gpt-oss, Bloom, Falcon and MPT skip: they build their masks without the position ids). Two rows of a few
    tokens in evaluation mode, the same last example behind two different first ones: its logits are the same
    only where it cannot see them. A forward that fails counts as not keeping them apart. `autocast`: the
    dtype training's forward computes in (an fp16 run's model may mix float32 and float16 layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab = int(getattr(getattr(base, "config", None), "vocab_size", 0) or 0)
    if vocab < 16:
        return True  # not a language model with a vocabulary to draw the two rows from
    device = next(model.parameters()).device
    last = Example((7, 8, 9), (8, 9, 0))
    logits = []
    try:
        with evaluating(model):
            for first in (tuple(range(3, 15)), tuple(range(vocab - 1, vocab - 13, -1))):  # most of what it could see
                rows = [[Example(first, first), last]]
                batch = collate_flat(rows, 0) if flat else collate(rows, 0)
                inputs = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
                          "use_cache": False}
                with torch.no_grad(), speed.varlen_attention(model) if flat else contextlib.nullcontext(), \
                        autocast_to(device.type, autocast):
                    if flat:
                        inputs.update(speed.flat_kwargs(batch, device))
                    logits.append(model(**inputs).logits[0, -3:])
    except Exception:  # noqa: BLE001 - see the docstring
        return False
    a, b = (x.float() for x in logits)
    # the same last example gives the same logits up to rounding: 16-bit kernels may order sums differently
    # between two calls; the first example seen, in any layer, moves them far more
    return bool((a - b).abs().max() <= (2e-2 if logits[0].dtype in (torch.float16, torch.bfloat16) else 1e-5)
                * a.abs().max())


def settle_attention(model: torch.nn.Module, plan: SpeedPlan, cfg: TrainConfig, *, packed: bool,
                     flat_possible: bool = True) -> None:
    """Keep every example to itself in the layout the plan took, checked on the model (`keeps_examples_apart`):
    flat rows on a model whose attention does not take them run padded (or fail, where `train.attention` asked
    for varlen); rows packing several examples (`packed`) on a model whose padded rows let them see each other
    run flat (or fail, where padded was asked for or the caller has no flat layout)."""
    apart = functools.partial(keeps_examples_apart, model, autocast=plan.autocast)
    if plan.varlen and not apart(flat=True):
        if cfg.attention == "varlen":
            raise TunesmithError("train.attention=varlen: this model's attention does not take flat rows (it does "
                                 "not go through the varlen implementation, so the examples in a row would see each "
                                 "other); set train.attention auto or padded")
        plan.varlen, plan.padded_reason = False, "this model's attention does not take flat rows"
    if packed and not plan.varlen and not apart(flat=False):
        if cfg.attention == "padded" or not flat_possible or not apart(flat=True):
            raise TunesmithError(
                "data.packing: this model's attention lets the examples packed in one padded row see each other "
                "(its masks ignore the position ids that separate them)" + (
                    "; set train.attention auto or varlen, which keep every example to itself, or data.packing "
                    "false" if cfg.attention == "padded" and flat_possible else "; set data.packing false"))
        plan.varlen, plan.flat_reason = True, "packed rows run flat: padded, their examples would see each other"


def _apply_liger(model: torch.nn.Module, plan: SpeedPlan) -> None:
    plan.undo_liger = speed.apply_liger(model)
    plan.liger = plan.undo_liger is not None


def _measure_activations(model: torch.nn.Module, plan: SpeedPlan) -> None:
    """What a block keeps for backward on the path set up so far (kernels, MLP chunks, the attention the
    plan picks), measured on two short forwards before anything is checkpointed or compiled, so the budget
    never counts less; and again with the MLPs recomputing their product, where they can. A model those
    forwards do not fit (inputs beyond token ids) keeps the estimate, and the plan says why. They run under
    training's autocast: what is kept is in the width training computes in."""
    kind = next(model.parameters()).device.type
    try:
        with speed.varlen_attention(model) if plan.varlen else contextlib.nullcontext(), \
                autocast_to(kind, plan.autocast):
            measured = speed.saved_bytes_per_token(model, flat=plan.varlen)
            lean = None
            if plan.budget.products:
                fused.recompute_products(speed.decoder_mlps(model), plan.budget.blocks)
                try:
                    lean = speed.saved_bytes_per_token(model, flat=plan.varlen)
                finally:
                    fused.recompute_products(speed.decoder_mlps(model), 0)
    except Exception as e:  # noqa: BLE001 - a refinement of the estimate, never a reason to fail the run
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        plan.measure_error = f"{type(e).__name__}: {first}" if first else type(e).__name__
        return
    plan.budget.observe(measured, lean)


def _apply_kernels(model: torch.nn.Module, plan: SpeedPlan) -> None:
    """Liger's kernels (unless the blocks are compiled: the compiler fuses the norms, RoPE and SwiGLU
    itself), then the MLP forwards that can recompute their product around whichever forward that left."""
    if not plan.compile:
        _apply_liger(model, plan)
    products = fused.fuse_mlps(model)
    if plan.budget is not None:
        plan.budget.allow_products(products)


@contextlib.contextmanager
def applied(model: torch.nn.Module, plan: SpeedPlan):
    """Varlen attention, checkpointing, offload hooks, fused kernels and compiled blocks for the duration
    of training (forward and backward alike); the model's own attention, layers and eager blocks come back
    after it."""
    if plan.fused:
        fused.fuse_lora(model)
        _apply_kernels(model, plan)
    speed.set_mlp_chunks(model, plan.mlp_chunk)  # around whichever MLP forward the kernels left
    if plan.budget is not None and plan.budget.measured is None and plan.measure_error is None:
        _measure_activations(model, plan)  # once a plan: RL enters `applied` at every step
    speed.set_checkpointing(model, plan.fixed_layers, offload=plan.offload)
    if plan.compile:
        speed.compile_blocks(model)
    try:
        with speed.varlen_attention(model) if plan.varlen else contextlib.nullcontext():
            yield
    finally:
        # taken off in the reverse order: each step puts back the forward the one before it found
        if plan.compile:
            speed.uncompile_blocks(model)
        speed.set_mlp_chunks(model, None)
        fused.unfuse_mlps(model)
        if plan.undo_liger is not None:  # Liger's kernels are for training: evaluation and generation run without
            plan.undo_liger()
            plan.undo_liger = None
        if plan.fused:
            fused.unfuse_lora(model)
        speed.set_checkpointing(model, 0)


def before_forward(model: torch.nn.Module, plan: SpeedPlan, tokens: int) -> int:
    """Set the checkpointed blocks for a micro-batch of `tokens`, the blocks whose MLP recomputes its product,
    and long mode when even every block checkpointed does not fit the budget; returns how many blocks are
    checkpointed."""
    plan.last_tokens = tokens
    if plan.checkpointing != "budget":
        return plan.fixed_layers
    long = plan.budget.long_for(tokens)
    layers, products = plan.plan_for(tokens)
    if plan.budget.products:
        fused.recompute_products(speed.decoder_mlps(model), products)
    speed.set_mlp_chunks(model, plan.mlp_chunk or (speed.LONG_MLP_CHUNK if long else None))
    return speed.set_checkpointing(model, layers, offload=plan.offload or long)


def after_out_of_memory(model: torch.nn.Module, plan: SpeedPlan, step: int, reason: str) -> str:
    """After the micro-batch `before_forward` last set up ran out of GPU memory in training step `step`:
    tighten the budget's estimate so that it checkpoints more blocks (or runs in long mode), free what the
    failed attempt left, and return what the next attempt will do (the caller drops the gradients and runs
    the step again). Raises where nothing more can be recomputed: a fixed setting, or long mode already."""
    tokens = plan.last_tokens
    if plan.checkpointing != "budget" or tokens is None or not plan.budget.tighten(tokens):
        fix = ("set train.checkpointing: auto, or lower the sequence length or train.micro_batch_size"
               if plan.checkpointing != "budget" else
               "it does not fit even with every block's input in host memory: lower the sequence length or "
               "train.micro_batch_size")
        raise TunesmithError(f"step {step}: out of GPU memory on a micro-batch of {tokens} tokens ({reason}); {fix}")
    fused.clear_pending(model)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    layers, products = plan.plan_for(tokens)
    how = ("long mode" if plan.budget.long_for(tokens)
           else f"{layers} of {plan.budget.blocks} blocks checkpointed"
           + (f" and {products} MLP products recomputed" if products else ""))
    return f"step {step}: a micro-batch of {tokens} tokens ran out of memory; the step runs again with {how} for it"


def compile_failed(err: BaseException) -> bool:
    """Whether `err` is torch.compile failing to trace or compile (not an error of the model's own code,
    which dynamo re-raises as it is)."""
    from torch._dynamo.exc import TorchDynamoException
    return isinstance(err, TorchDynamoException)


def compile_failure_reason(err: BaseException) -> str:
    """A dynamo error in a line: its first paragraph (what failed), and the innermost frame of the traced
    code it names, if any (where)."""
    text = str(err).strip()
    what = " ".join(ln.strip() for ln in text.split("\n\n")[0].splitlines() if ln.strip())
    frames = [ln.strip() for ln in text.split("from user code:")[-1].splitlines() if ln.strip().startswith("File ")]
    where = f" at {frames[-1]}" if "from user code:" in text and frames else ""
    return f"{type(err).__name__}: {what}{where}"


def after_compile_failure(model: torch.nn.Module, plan: SpeedPlan, step: int, reason: str) -> str:
    """After compiling the blocks failed in training step `step` (`reason`: `compile_failure_reason`): put
    the eager blocks back for the rest of the run and return the message (the caller drops the gradients
    and runs the step again)."""
    speed.uncompile_blocks(model)
    fused.clear_pending(model)
    plan.compile, plan.compile_error = False, reason[:300]
    if plan.fused and plan.undo_liger is None:  # the eager blocks take Liger's kernels, as without compile
        speed.set_mlp_chunks(model, None)  # Liger replaces the MLP forward: the chunks go around its own
        fused.unfuse_mlps(model)
        _apply_kernels(model, plan)
        speed.set_mlp_chunks(model, plan.mlp_chunk)
    message = (f"step {step}: compiling the transformer blocks failed ({plan.compile_error}); the step runs "
               "again and training goes on with eager blocks")
    warnings.warn(message, stacklevel=2)
    return message


def until_it_fits(attempt: Callable[[], T], model: torch.nn.Module, plan: SpeedPlan, step: int,
                  optimizer: torch.optim.Optimizer, run: RunDir) -> T:
    """`attempt()` (the backward passes of one optimiser step), run again after each out-of-memory error
    that more recomputation can cure, and after compiled blocks fail to compile (they then run eagerly):
    the gradients it left are dropped and the retry is logged as an `out_of_memory` or `compile_failed`
    event (see `after_out_of_memory`, which raises where nothing more can be done)."""
    while True:
        compiling = False
        try:
            return attempt()
        except torch.OutOfMemoryError as err:
            reason = str(err).split("\n")[0]
        except RuntimeError as err:
            if not (plan.compile and compile_failed(err)):
                raise
            compiling, reason = True, compile_failure_reason(err)
        # past the handler: the failed attempt's traceback, and the tensors its frames held, are released
        optimizer.zero_grad(set_to_none=True)
        if compiling:
            run.event("compile_failed", after_compile_failure(model, plan, step, reason), step=step - 1)
        else:
            run.event("out_of_memory", after_out_of_memory(model, plan, step, reason), step=step - 1)
