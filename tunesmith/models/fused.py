"""Fused LoRA layers for training (`train.kernels`).

A PEFT LoRA layer computes `x W^T + s (x A^T) B^T` as several separate passes: the base product, a
dropout call, the rank-r product, the scale and the add. `_LoRALinear` does it in one autograd node, with
the adapter product added inside the second matmul.

Projections that read the same input (a block's q/k/v, its gate/up) go further as one group
(`_GroupedLoRA`): their adapters' rank-r products come from one matmul over the concatenated A matrices,
so the input is read once rather than once per projection, and in backward the input gradient of the
whole group is accumulated into one buffer and the A gradients come from one matmul. The base products
stay separate, each into its own contiguous output, so what the attention and MLP code receives is what
it received before. The first member called computes the group; its siblings, called next with the same
tensor, take their outputs from it.

A base stored in FP8 (`method.lora.fp8_base`) runs its product in FP8 inside these too, from the input
quantised once per group. Layers in a state these do not cover (adapters switched off or merged, several
adapters, DoRA, dropout, a 4/8-bit quantised or trainable base) take PEFT's own forward, call by call.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from tunesmith._core.found import found_once
from tunesmith._core.precision import compute_dtype
from tunesmith.models.fp8 import FP8Linear, quantise_rows, scaled_input_grad, scaled_product

# sibling projections that a block calls with the same tensor, in the order it calls them
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# A frozen base is (weight, row scales, bias): a plain linear layer's weight with no scales, or an FP8
# layer's e4m3 weight with its scales (`models.fp8`). Its product runs in FP8 from the input quantised
# once per call, and so does its input gradient (`scaled_input_grad`).


def _base_product(x2: torch.Tensor, x8: tuple | None, weight: torch.Tensor, wscale: torch.Tensor | None,
                  bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if wscale is not None:
        return scaled_product(*x8, weight, wscale, bias, dtype)
    w = weight.to(dtype)
    return x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())


def _add_input_grad(grad_x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, wscale: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """grad_x += g W, the base's part of the input gradient (an FP8 product for an FP8 base)."""
    if wscale is None:
        return grad_x.addmm_(g, weight.to(dtype))
    return grad_x.add_(scaled_input_grad(g, weight, wscale, dtype))


# Optimiser steps so far, in this process (any torch optimiser): the adapters' weights in the compute dtype are
# made once per step and dtype (`adapter_copies`), and a step is what changes the weights.
_STEPS = [0]


def _count_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def adapter_copies(owner: Any, dtype: torch.dtype, lora_as: list[torch.Tensor],
                   lora_bs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The A matrices (stacked, for a group) and the B matrices of the adapters `owner` runs, in `dtype`.

    PEFT keeps the adapters of a bf16 model in float32, so every forward (and every recomputation of a
    checkpointed block) cast each of them and stacked a group's A matrices: about 14 small kernels a block
    on the 1B shape. Between optimiser steps the weights do not change, so the copies are made once and
    kept on `owner`, under a key of the step count and each weight's storage and version (an in-place
    change outside an optimiser step makes them anew too). Compiled code casts as it goes (the compiler
    fuses the casts)."""
    if torch.compiler.is_compiling():
        return torch.cat([p.to(dtype) for p in lora_as]), [p.to(dtype) for p in lora_bs]
    key = (dtype, _STEPS[0], tuple((p.data_ptr(), p._version) for p in (*lora_as, *lora_bs)))
    cached = owner.__dict__.get("_tunesmith_copies")
    if cached is None or cached[0] != key:
        a = lora_as[0].detach().to(dtype) if len(lora_as) == 1 else torch.cat([p.detach().to(dtype) for p in lora_as])
        cached = owner.__dict__["_tunesmith_copies"] = (key, (a, [p.detach().to(dtype) for p in lora_bs]))
    return cached[1]


def forget_copies(model: torch.nn.Module) -> None:
    """Drop the copies `adapter_copies` keeps, on each LoRA layer and on its group (a group keeps its members'
    copies: its forward is their owner)."""
    for m in lora_layers(model):
        for owner in (m, m.__dict__.get("_tunesmith_group")):
            getattr(owner, "__dict__", {}).pop("_tunesmith_copies", None)


def _gemm_float32(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha (a @ b) written in float32 by the GEMM itself from 16-bit operands (CUDA only)."""
    return torch.addmm(a.new_empty((), dtype=torch.float32), a, b, beta=0, alpha=alpha, out_dtype=torch.float32)


def _writes_float32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether GEMMs on `device` write float32 from 16-bit `dtype` operands themselves (`out_dtype`, in CUDA
    builds of recent torch): checked once per device and dtype on a small product. The float32 adapters'
    gradients then come out of their GEMM as they are stored, with no cast kernel each (14 a block on the 1B
    shape)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return False

    def check() -> bool:
        g = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(*shape, generator=g, device=device) for shape in ((8, 16), (16, 4)))
        try:
            got = _gemm_float32(a.to(dtype), b.to(dtype), 0.5)
        except Exception:  # noqa: BLE001 - a build without the kernel casts after the GEMM
            return False
        return got.dtype == torch.float32 and torch.allclose(got, 0.5 * a @ b, rtol=2e-2, atol=2e-2)

    return found_once(("gemm float32 out", device, dtype), check)


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, alpha: float, out: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """alpha (a @ b) as one GEMM, the scale applied inside it rather than by a pass of its own (addmm with
    beta 0 reads nothing of its first argument), in `dtype` (a's by default): float32 from 16-bit operands
    comes out of the GEMM itself where the device's GEMM writes it (`_writes_float32`), else by a cast."""
    if dtype is not None and dtype != a.dtype:
        if dtype == torch.float32 and _writes_float32(a.device, a.dtype):
            return _gemm_float32(a, b, alpha)
        return _mm_scaled(a, b, alpha).to(dtype)
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=alpha, out=out)


class _LoRALinear(torch.autograd.Function):
    """y = x W^T (+ bias) + s (x A^T) B^T, in the compute dtype, with the adapter product added inside
    the second matmul (addmm) rather than as separate passes; gradients for x, A and B only (the base
    weight is frozen). Saves x and the rank-r product x A^T, as the unfused path does. `owner` keeps the
    adapter's weights in the compute dtype (`adapter_copies`)."""

    @staticmethod
    def forward(ctx, x, weight, wscale, bias, lora_a, lora_b, scaling, owner):
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, (b,) = adapter_copies(owner, dtype, [lora_a], [lora_b])
        xa = x2 @ a.t()
        out = _base_product(x2, None if wscale is None else quantise_rows(x2), weight, wscale, bias, dtype)
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, wscale, a, b)
        ctx.meta = (x.shape, x.dtype, lora_a.dtype, lora_b.dtype, scaling)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, xa, weight, wscale, a, b = ctx.saved_tensors
        shape, x_dtype, a_dtype, b_dtype, scaling = ctx.meta
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gb = _mm_scaled(g, b, scaling)  # (T, r): the gradient reaching the rank-r product, scaling included
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _add_input_grad(gb @ a, g, weight, wscale, x2.dtype).view(shape).to(x_dtype)
        if ctx.needs_input_grad[4]:
            grad_a = _mm_scaled(gb.t(), x2, 1.0, dtype=a_dtype)
        if ctx.needs_input_grad[5]:
            grad_b = _mm_scaled(g.t(), xa, scaling, dtype=b_dtype)
        return grad_x, None, None, None, grad_a, grad_b, None, None


class _GroupedLoRA(torch.autograd.Function):
    """Several LoRA layers on one input x: outputs `x W_i^T (+ bias_i) + s_i (x A_i^T) B_i^T`, with
    `x [A_1; A_2; ...]^T` computed once (and x quantised once for FP8 bases). `params` holds (weight,
    row scales or None, bias, A, B) per layer; each scaling s_i is applied inside its GEMMs. Backward: the
    gradient reaching each rank-r product, `s_i g_i B_i`, each member's written into its rows of one
    buffer by its own GEMM; the input gradient `sum_i g_i W_i + [gB] [A]` accumulated in place; the A
    gradients `[gB]^T x` in one matmul. `owner` keeps the stacked A and the B matrices in the compute
    dtype (`adapter_copies`)."""

    @staticmethod
    def forward(ctx, x, scalings, owner, *params):
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        weights, wscales, biases = params[0::5], params[1::5], params[2::5]
        a, bs = adapter_copies(owner, dtype, list(params[3::5]), list(params[4::5]))
        ranks = [b.shape[1] for b in bs]
        xa = x2 @ a.t()  # (T, sum of ranks): every adapter's rank-r product, x read once
        x8 = quantise_rows(x2) if any(ws is not None for ws in wscales) else None
        outs, start = [], 0
        for w, ws, bias, b, r, s in zip(weights, wscales, biases, bs, ranks, scalings):
            out = _base_product(x2, x8, w, ws, bias, dtype)
            out.addmm_(xa[:, start:start + r], b.t(), alpha=s)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
            start += r
        ctx.save_for_backward(x2, xa, a, *weights, *wscales, *bs)
        ctx.meta = (x.shape, x.dtype, ranks, list(scalings), [p.dtype for p in params[3::5]],
                    [p.dtype for p in params[4::5]])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, xa, a, *rest = ctx.saved_tensors
        shape, x_dtype, ranks, scalings, a_dtypes, b_dtypes = ctx.meta
        n = len(ranks)
        weights, wscales, bs = rest[:n], rest[n:2 * n], rest[2 * n:]
        gs = [g.reshape(-1, g.shape[-1]).to(x2.dtype) for g in grads]
        # the gradient reaching the rank-r products, scalings included, (sum of ranks, T): each member's
        # rows written by its own GEMM, no concatenation
        gb_t = x2.new_empty(sum(ranks), x2.shape[0])
        start = 0
        for g, b, r, s in zip(gs, bs, ranks, scalings):
            _mm_scaled(b.t(), g.t(), s, out=gb_t[start:start + r])
            start += r
        out: list[Any] = [None, None, None]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gb_t.t() @ a
            for g, w, ws in zip(gs, weights, wscales):
                _add_input_grad(grad_x, g, w, ws, x2.dtype)
            grad_x = grad_x.view(shape).to(x_dtype)
        out[0] = grad_x
        a_dtype = a_dtypes[0] if len(set(a_dtypes)) == 1 else x2.dtype  # the A gradients' GEMM writes theirs
        grad_a = _mm_scaled(gb_t, x2, 1.0, dtype=a_dtype) if any(ctx.needs_input_grad[6::5]) else None
        start = 0
        for i, (g, r) in enumerate(zip(gs, ranks)):
            ga = gb_ = None
            if ctx.needs_input_grad[6 + 5 * i]:
                ga = grad_a[start:start + r].to(a_dtypes[i])
            if ctx.needs_input_grad[7 + 5 * i]:
                gb_ = _mm_scaled(g.t(), xa[:, start:start + r], scalings[i], dtype=b_dtypes[i])
            out += [None, None, None, ga, gb_]
            start += r
        return tuple(out)


@functools.lru_cache(maxsize=None)
def _liger_gated(kind: str) -> tuple[Callable, Callable] | None:
    """Liger's forward (`c = act(a) b`) and backward (which writes the gradients over a and b) Triton kernels
    for a gated MLP's product, `silu` (SwiGLU) or `gelu_tanh` (GeGLU), when liger-kernel is installed."""
    try:
        if kind == "silu":
            from liger_kernel.ops.swiglu import swiglu_backward as backward, swiglu_forward as forward
        else:
            from liger_kernel.ops.geglu import geglu_backward as backward, geglu_forward as forward
    except Exception:  # noqa: BLE001 - not installed, or no Triton: PyTorch's operators
        return None
    return forward, backward


def _gated_kernels(kind: str, gate: torch.Tensor, up: torch.Tensor) -> tuple[Callable, Callable] | None:
    # compiled code fuses PyTorch's operators itself; Liger's kernels read gate and up as whole rows (not the
    # halves of one projection's output, as in Phi-3)
    if not gate.is_cuda or torch.compiler.is_compiling() or not (gate.is_contiguous() and up.is_contiguous()):
        return None
    return _liger_gated(kind)


def _act(kind: str, gate: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) if kind == "silu" else F.gelu(gate, approximate="tanh")


def _gated(kind: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    kernels = _gated_kernels(kind, gate, up)
    return kernels[0](gate, up)[2] if kernels else _act(kind, gate) * up


def _gated_backward(kind: str, gate: torch.Tensor, up: torch.Tensor,
                    grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients reaching gate and up from `grad`, the gradient of act(gate) up. Liger's kernel writes
    them over `gate` and `up`, which nothing reads after this backward."""
    kernels = _gated_kernels(kind, gate, up)
    if kernels:
        return kernels[1](gate, up, grad)
    grad_act = grad * up
    grad_gate = (torch.ops.aten.silu_backward(grad_act, gate) if kind == "silu"
                 else torch.ops.aten.gelu_backward(grad_act, gate, approximate="tanh"))
    return grad_gate, grad * _act(kind, gate)


class _GatedDown(torch.autograd.Function):
    """A gated MLP's product and LoRA down projection, `h = act(gate) up; y = h W^T + s (h A^T) B^T` (`kind`
    `silu`: SwiGLU, Llama and its kin; `gelu_tanh`: GeGLU, Gemma), keeping gate and up for backward but not h:
    backward recomputes h (one elementwise pass) for the A gradient. The product's own backward needs gate and
    up anyway, so the MLP keeps two tensors of its intermediate width per token instead of three (Liger's
    kernels, which recompute act(gate)) or four (PyTorch's operators): on Llama shapes about a fifth of a
    block's activations. `owner` (the down layer) keeps the adapter's weights in the compute dtype
    (`adapter_copies`)."""

    @staticmethod
    def forward(ctx, gate, up, weight, wscale, bias, lora_a, lora_b, scaling, owner, kind):
        dtype = compute_dtype(gate)
        h2 = _gated(kind, gate, up).reshape(-1, gate.shape[-1]).to(dtype)
        a, (b,) = adapter_copies(owner, dtype, [lora_a], [lora_b])
        xa = h2 @ a.t()
        out = _base_product(h2, None if wscale is None else quantise_rows(h2), weight, wscale, bias, dtype)
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(gate, up, xa, weight, wscale, a, b)
        ctx.meta = (lora_a.dtype, lora_b.dtype, scaling, kind)
        return out.view(*gate.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        gate, up, xa, weight, wscale, a, b = ctx.saved_tensors
        a_dtype, b_dtype, scaling, kind = ctx.meta
        g = grad.reshape(-1, grad.shape[-1]).to(xa.dtype)
        gb = _mm_scaled(g, b, scaling)  # (T, r): the gradient reaching the rank-r product, scaling included
        grad_a = grad_b = grad_gate = grad_up = None
        if ctx.needs_input_grad[5]:
            h2 = _gated(kind, gate, up).reshape(-1, gate.shape[-1]).to(xa.dtype)  # recomputed, not kept
            grad_a = _mm_scaled(gb.t(), h2, 1.0, dtype=a_dtype)
            del h2
        if ctx.needs_input_grad[6]:
            grad_b = _mm_scaled(g.t(), xa, scaling, dtype=b_dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_h = _add_input_grad(gb @ a, g, weight, wscale, xa.dtype).view(gate.shape).to(gate.dtype)
            grad_gate, grad_up = _gated_backward(kind, gate, up, grad_h)
        return grad_gate, grad_up, None, None, None, grad_a, grad_b, None, None, None


def frozen_base(module: torch.nn.Module) -> tuple | None:
    """(weight, row scales or None, bias) of a PEFT layer's base when the fused layers can take it: a
    frozen plain linear layer or an FP8 one; None for anything else (quantised, trainable)."""
    base = module.base_layer
    if type(base) is FP8Linear:
        return base.weight8, base.scale, base.bias
    if type(base) is torch.nn.Linear and not base.weight.requires_grad:
        return base.weight, None, base.bias
    return None


def fused_lora_target(module: torch.nn.Module) -> str | None:
    """The one plain LoRA adapter this PEFT layer runs now, or None when the layer must take PEFT's own
    forward (adapters off or merged, several or DoRA adapters, dropout in training mode, a quantised or
    trainable base). An adapter's dropout in evaluation mode drops nothing: the fused layers take it."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}) or frozen_base(module) is None:
        return None
    dropout = module.lora_dropout[name]
    return name if isinstance(dropout, torch.nn.Identity) or not dropout.training else None


def _fused_lora_forward(self, x, *args, **kwargs):
    name = None if args or kwargs else fused_lora_target(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    return _LoRALinear.apply(x, *frozen_base(self), self.lora_A[name].weight, self.lora_B[name].weight,
                             self.scaling[name], self)


class _Group:
    """Sibling LoRA layers called with the same tensor. `pending` holds the outputs the first member's
    call computed for the others, until each takes its own (or the next call with another tensor)."""

    def __init__(self, layers: list[torch.nn.Module]):
        self.layers = layers
        self.input: torch.Tensor | None = None
        self.pending: dict[int, torch.Tensor] = {}

    def output(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        i = next(k for k, m in enumerate(self.layers) if m is layer)
        if self.input is x and i in self.pending:
            out = self.pending.pop(i)
            if not self.pending:
                self.input = None
            return out
        self.clear()
        names = [fused_lora_target(m) for m in self.layers]
        if None in names:
            return None
        params: list[Any] = []
        for m, name in zip(self.layers, names):
            params += [*frozen_base(m), m.lora_A[name].weight, m.lora_B[name].weight]
        outs = _GroupedLoRA.apply(x, tuple(m.scaling[n] for m, n in zip(self.layers, names)), self, *params)
        self.input, self.pending = x, {k: o for k, o in enumerate(outs) if k != i}
        return outs[i]

    def clear(self) -> None:
        self.input, self.pending = None, {}


def clear_pending(model: torch.nn.Module) -> None:
    """Drop the outputs groups hold for members not called yet (after a forward that did not finish)."""
    for m in model.modules():
        group = getattr(m, "_tunesmith_group", None)
        if group is not None:
            group.clear()


def _grouped_forward(self, x, *args, **kwargs):
    out = None if args or kwargs else self._tunesmith_group.output(self, x)
    return _fused_lora_forward(self, x, *args, **kwargs) if out is None else out


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from peft.tuners.lora import Linear
    except ImportError:
        return []
    return [m for m in model.modules() if type(m) is Linear]


def _groups(model: torch.nn.Module, lora: list[torch.nn.Module]) -> list[_Group]:
    """Two or more of the LoRA layers `lora` that are siblings of one of `SHARED_INPUT` under one parent, on
    frozen bases (plain or FP8) of one input width and device."""
    ids = {id(m) for m in lora}
    groups = []
    for parent in model.modules():
        for names in SHARED_INPUT:
            layers = [getattr(parent, n, None) for n in names]
            layers = [m for m in layers if id(m) in ids and frozen_base(m) is not None]
            if len(layers) < 2:
                continue
            weights = [frozen_base(m)[0] for m in layers]
            if len({(w.shape[1], w.device) for w in weights}) == 1:
                groups.append(_Group(layers))
    return groups


def fuse_lora(model: torch.nn.Module) -> int:
    """Route every plain PEFT LoRA linear layer through `_LoRALinear`, and siblings that read one input
    through `_GroupedLoRA` (layers in a state neither covers fall back to PEFT's forward call by call).
    Returns the number of layers routed."""
    layers = lora_layers(model)
    for m in layers:
        m.forward = _fused_lora_forward.__get__(m)
    for group in _groups(model, layers):
        for m in group.layers:
            m._tunesmith_group = group
            m.forward = _grouped_forward.__get__(m)
    return len(layers)


def _gate_kind(module: Any) -> str | None:
    """`silu` or `gelu_tanh` for the gate activations `_GatedDown` computes (PyTorch's and transformers'
    modules), None for any other."""
    name = type(module).__name__
    if isinstance(module, torch.nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if (isinstance(module, torch.nn.GELU) and module.approximate == "tanh") or name in ("GELUTanh", "PytorchGELUTanh"):
        return "gelu_tanh"
    return None


def _product_recomputing_forward(self, x, *args, **kwargs):
    recompute, previous, kind = self._tunesmith_product
    down = self.down_proj
    name = fused_lora_target(down) if recompute and not args and not kwargs else None
    if name is None:
        return (previous or functools.partial(type(self).forward, self))(x, *args, **kwargs)
    if "gate_up_proj" in self._modules:  # one projection for both, gate first (Phi-3)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    return _GatedDown.apply(gate, up, *frozen_base(down), down.lora_A[name].weight, down.lora_B[name].weight,
                            down.scaling[name], down, kind)


def _gated_mlp(module: torch.nn.Module) -> str | None:
    """The gate's kind (`_gate_kind`) where `module` is a gated MLP: gate_proj and up_proj, or one gate_up_proj
    (Phi-3), an activation (`act_fn`, or Phi-3's `activation_fn`) and down_proj; else None."""
    children = module._modules
    projections = ("gate_proj" in children and "up_proj" in children) or "gate_up_proj" in children
    act = children.get("act_fn", children.get("activation_fn"))
    return _gate_kind(act) if projections and "down_proj" in children else None


def fuse_mlps(model: torch.nn.Module) -> int:
    """Give each gated MLP (`_gated_mlp`: SwiGLU or GeGLU) whose down projection is a PEFT LoRA layer a forward
    that, once `recompute_products` turns it on, keeps gate and up for backward rather than their product
    (`_GatedDown`); until then, and where the down layer is in a state the fused layers do not cover, it runs
    the forward the MLP had (a kernel library's, such as Liger's, or its class's). Returns the count. Apply
    after any library that rebinds MLP forwards, and undo (`unfuse_mlps`) before undoing it."""
    ids = {id(m) for m in lora_layers(model)}
    n = 0
    for mlp in model.modules():
        kind = _gated_mlp(mlp)
        if (kind is not None and id(mlp._modules["down_proj"]) in ids
                and "_tunesmith_product" not in mlp.__dict__):
            mlp._tunesmith_product = [False, mlp.__dict__.get("forward"), kind]
            mlp.forward = _product_recomputing_forward.__get__(mlp)
            n += 1
    return n


def recompute_products(mlps: list[torch.nn.Module], n: int) -> int:
    """Turn on the product recomputation (`fuse_mlps`) in the last `n` of `mlps` and off in the others;
    returns how many are on."""
    fused = [m for m in mlps if "_tunesmith_product" in m.__dict__]
    for i, mlp in enumerate(fused):
        mlp._tunesmith_product[0] = i >= len(fused) - n
    return min(max(n, 0), len(fused))


def unfuse_mlps(model: torch.nn.Module) -> None:
    for mlp in model.modules():
        state = mlp.__dict__.pop("_tunesmith_product", None)
        if state is not None:
            mlp.__dict__.pop("forward", None)
            if state[1] is not None:
                mlp.forward = state[1]


def unfuse_lora(model: torch.nn.Module) -> None:
    forget_copies(model)
    for m in lora_layers(model):
        m.__dict__.pop("forward", None)
        group = m.__dict__.pop("_tunesmith_group", None)
        if group is not None:
            group.clear()


def lora_fused(model: torch.nn.Module) -> bool:
    """Whether `fuse_lora` routes this model's LoRA layers now."""
    return any("forward" in m.__dict__ for m in lora_layers(model))


@contextlib.contextmanager
def fused_for_inference(model: torch.nn.Module, on: bool = True) -> Iterator[None]:
    """The fused LoRA layers for a stretch of forwards without gradients (a generation): `fuse_lora` for its
    duration when `on` and the model is not fused already, `unfuse_lora` after. A model fused already (by
    training's `applied`) stays so, but forgets the adapter copies and pending group outputs made inside:
    copies made in inference mode cannot be saved for a training backward."""
    mine = on and not lora_fused(model) and fuse_lora(model) > 0
    try:
        yield
    finally:
        if mine:
            unfuse_lora(model)
        else:
            forget_copies(model)
            clear_pending(model)
