"""FP8 frozen base weights under LoRA (`method.lora.fp8_base`).

The base weight of every adapted linear layer is stored as float8 e4m3 with one float32 scale per output
row (the row's largest magnitude maps to 448, e4m3's largest value): half the memory of bf16. The forward
product runs in FP8: each input row (token) is scaled the same way on the fly and `torch._scaled_mm`
multiplies the two, rescaling the result per row and column (Hopper and Ada GPUs run it on FP8 tensor
cores; the CPU has a reference implementation). Backward needs only the input gradient, `g W` (a frozen
weight has no gradient, and nothing of the forward is kept for it), and it is an FP8 product too: the
weight's row scales are folded into g, g is quantised per row, and the weight is read transposed, as
torchao's row-wise float8 recipe does. The LoRA branch beside it is PEFT's in the compute dtype, or
under `train.kernels` the fused layers' (`models.fused`), which take these products too.

The adapter trains against the FP8-rounded base; the saved adapter is a plain LoRA adapter of the
original model.
"""
from __future__ import annotations

from typing import Any

import torch

from tunesmith._core.errors import TunesmithError
from tunesmith._core.precision import compute_dtype

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantise_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale per row) with `values * scale[:, None]` ~ t. The scale is rounded to
    t's dtype before dividing, so the scale returned is exactly the one the values were divided by."""
    # clamped after the cast: a row of zeros (or of values float16 cannot scale) divides by the dtype's
    # smallest normal, not by 0
    scale = (t.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).to(t.dtype).clamp(min=torch.finfo(t.dtype).tiny)
    return (t / scale).to(E4M3).contiguous(), scale.float()  # row-major, as the FP8 kernel's first operand


def scaled_product(x8: torch.Tensor, x_scale: torch.Tensor, weight8: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(T, out) = (x8 * x_scale) (weight8 * scale)^T (+ bias) in `dtype`, from `quantise_rows` of a (T, in)
    input and an e4m3 weight with its (out,) row scales."""
    # the CUDA kernel writes bf16 here (also for float32 and float16 runs, which are cast from it)
    out_dtype = torch.bfloat16 if x8.is_cuda else dtype
    out = torch._scaled_mm(x8, weight8.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=out_dtype)
    out = out.to(dtype)
    return out if bias is None else out.add_(bias.to(dtype))


def scaled_input_grad(grad: torch.Tensor, weight8: torch.Tensor, scale: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """(T, in) = grad (weight8 * scale) in `dtype`, the input gradient of a (T, out) output gradient, as an
    FP8 product: the weight's row scales are folded into the gradient's columns (they lie along the summed
    dimension, where the kernel takes no scale), the gradient is quantised per row, and the weight is read
    transposed (the kernel's second operand is column-major: one e4m3 copy, half a bf16 weight's size)."""
    g8, g_scale = quantise_rows(grad * scale.to(grad.dtype))
    weight_t = weight8.t().contiguous().t()
    ones = torch.ones(1, weight8.shape[1], dtype=torch.float32, device=grad.device)
    out_dtype = torch.bfloat16 if g8.is_cuda else dtype
    return torch._scaled_mm(g8, weight_t, scale_a=g_scale, scale_b=ones, out_dtype=out_dtype).to(dtype)


def dequantise(weight8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`: what the input gradient is taken against, one layer at a time."""
    return weight8.to(dtype) * scale.to(dtype)[:, None]


class _FP8Matmul(torch.autograd.Function):
    """x W^T (+ bias) with x quantised per row and W stored per row in e4m3; gradient for x only."""

    @staticmethod
    def forward(ctx, x, weight8, scale, bias, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        out = scaled_product(*quantise_rows(x2), weight8, scale, bias, dtype)
        ctx.save_for_backward(weight8, scale)
        ctx.meta = (x.shape, x.dtype, dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight8, scale = ctx.saved_tensors
        shape, x_dtype, dtype = ctx.meta
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        return scaled_input_grad(g, weight8, scale, dtype).view(shape).to(x_dtype), None, None, None, None


class FP8Linear(torch.nn.Module):
    """A frozen `nn.Linear` whose weight is stored in e4m3 with a scale per output row (buffers, so an
    optimiser never sees them). It has no `weight`: code that would read or rewrite the full-precision
    weight (merging an adapter into it) fails instead of working on a copy."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight8, scale = quantise_rows(linear.weight.detach())
        self.register_buffer("weight8", weight8)
        self.register_buffer("scale", scale.view(-1))
        self.dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def _apply(self, fn: Any, recurse: bool = True) -> "FP8Linear":
        """A dtype cast of the model (`.to(torch.bfloat16)`, `.half()`) would turn the e4m3 values and
        their float32 scales into something else: they only follow device moves."""
        weight8, scale = self.weight8, self.scale
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.dtype, device=weight8.device))
        self.weight8, self.scale, self.dtype = weight8.to(probe.device), scale.to(probe.device), probe.dtype
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8Matmul.apply(x, self.weight8, self.scale, self.bias, compute_dtype(x))

    def dequantised(self) -> torch.Tensor:
        return dequantise(self.weight8, self.scale, self.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=e4m3 with row scales"


def fits_fp8(linear: torch.nn.Module) -> bool:
    """FP8 matmuls need both dimensions of the weight to be multiples of 16."""
    return type(linear) is torch.nn.Linear and linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def check_device(device: torch.device) -> None:
    """FP8 matmuls run on CUDA GPUs of compute capability 8.9 and newer (Ada, Hopper, Blackwell), and on a
    CPU through PyTorch's reference implementation; on an older GPU, say so before training rather than at
    the first forward."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise TunesmithError(f"method.lora.fp8_base needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: set "
                             "fp8_base false (or use qlora for a smaller base)")


def to_fp8_bases(model: torch.nn.Module) -> int:
    """Store the base weight of every PEFT LoRA linear layer of `model` in FP8 (layers whose shape FP8
    matmuls cannot take keep theirs). Returns the number converted."""
    from peft.tuners.lora import Linear

    n = 0
    for module in model.modules():
        if type(module) is Linear and fits_fp8(module.base_layer):
            module.base_layer = FP8Linear(module.base_layer)
            n += 1
    return n


def has_fp8(model: Any) -> bool:
    return any(isinstance(m, FP8Linear) for m in model.modules())
