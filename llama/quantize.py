"""Weight-only quantization for inference: int8 and int4 weights in groups, each group with its own scale.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth, not
arithmetic: fewer bytes per weight is more tokens per second, and quantization is what fits Llama 3.1
8B (16 GB in bf16) on a 16 GB laptop. A scale per group of 32-256 input weights (as llama.cpp's Q8_0 and
Q4_0 keep one per 32) follows the weights' local size far better than one per row: an outlier spoils
only its own group. docs/quantization.md measures each choice against the fp32 model and llama.cpp.

- int4 (`Int4Linear`): each group maps [min, max] onto the codes 0..15, w = (q - 8) * scale + zero
  (asymmetric, like llama.cpp's Q4_1). The product is torch's own kernel,
  `aten._weight_int4pack_mm_for_cpu`, which unpacks the codes inside the matrix product: the 4-bit
  weights are all it reads.
- int8 (`GroupInt8Linear`): each group maps its largest |weight| onto 127 (absmax, as Q8_0). torch has no
  group-wise int8 kernel, so each code is split into two 4-bit halves, q = 16 * hi + lo, and the int4
  kernel multiplies both at once: [x, x] [16 hi s | lo s]^T = x (q s)^T, exactly the int8 weights.
- `--group-size 0` with int8 (`Int8Linear`): one scale per row through `torch._weight_int8pack_mm`,
  which inductor (compile=True) lowers to its C++ GEMM template: the fastest compiled decode, the
  least accurate.
Activations stay in floating point (bf16 for an fp32 model on the CPU: the kernels' fp32 path is
many times slower there); only the weights are quantized.

Under model parallelism each rank quantizes its own shard: a row-parallel layer holds a slice of the
input features, so the group size must divide that slice (checked, one line otherwise).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama import parallel
from llama.errors import ArgumentError, UserError

QUANTIZE_CHOICES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
DEFAULT_GROUP_SIZE = {"int8": 64, "int4": 32}  # measured: docs/quantization.md


def int4_kernel_available() -> bool:
    """Whether this torch has the CPU int4 kernel that int4 and group-wise int8 use."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def compute_dtype_for(weight: torch.Tensor) -> torch.dtype:
    """The kernels want activations and scales in one floating dtype. On the CPU their bf16 path is
    several times faster than their fp32 one, so fp32 models compute these products in bf16 there."""
    return torch.bfloat16 if weight.device.type == "cpu" and weight.dtype == torch.float32 else weight.dtype


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 rows (out, in) and per-row scales (out,)."""

    def __init__(self, weight: torch.Tensor, compute_dtype=None):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.compute_dtype = compute_dtype or compute_dtype_for(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(self.compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if flat.shape[0] > 32 and x.dtype == torch.float32:
            # Many rows (a prefill chunk): the product is compute-bound, not bandwidth-bound, and the
            # fp32 GEMM beats the int8 kernel (512 x 576 x 1536 on 2 cores: 7 ms vs 16 ms) even
            # after dequantizing the weight, which is one pass over it.
            y = F.linear(flat, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        else:
            y = torch._weight_int8pack_mm(flat.to(self.compute_dtype), self.weight, self.scales).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def int4_codes(w: torch.Tensor, group_size: int, dtype: torch.dtype):
    """(out, in) floats -> codes (out, in) in 0..15 and scales, zeros (out, in / group_size) in `dtype`,
    with w ~ (q - 8) * scale + zero. The codes are rounded against the stored (rounded) scale and zero."""
    groups = w.reshape(w.shape[0], -1, group_size)  # (out, G, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12).to(dtype).float()
    zero = (lo + 8 * scale).to(dtype).float()
    q = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    return q.reshape(w.shape).to(torch.int32), scale, zero


def int8_codes(w: torch.Tensor, group_size: int, dtype: torch.dtype):
    """(out, in) floats -> int8 codes (out, in) in -127..127 and scales (out, in / group_size), w ~ q * scale."""
    groups = w.reshape(w.shape[0], -1, group_size)  # (out, G, group)
    scale = (groups.abs().amax(-1) / 127).clamp_min(1e-12).to(dtype).float()
    q = torch.round(groups / scale[..., None]).clamp(-127, 127)
    return q.reshape(w.shape).to(torch.int32), scale


@torch.library.custom_op("llama::int4_mm", mutates_args=())
def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """torch's int4 kernel as an opaque op: under compile inductor calls it as it is. Its own lowering
    offers only its C++ template on AVX-512 CPUs, so with the template as the only GEMM backend
    (LLAMA_COMPILE_GEMM=template) an AVX2 CPU had no way to run the product at all."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


@int4_mm.register_fake
def _(x, packed, group_size, scales_and_zeros):
    return x.new_empty(x.shape[0], packed.shape[0])


class Int4Linear(nn.Module):
    """y = x W^T with W stored as 4-bit codes in the int4 kernel's packed layout (out, in / 2 bytes) and,
    per group of `group_size` inputs, a scale and a zero: `scales_and_zeros` (in / group_size, out, 2)."""

    def __init__(self, weight: torch.Tensor, group_size: int, compute_dtype=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        self.compute_dtype = compute_dtype or compute_dtype_for(weight)
        q, scale, zero = int4_codes(weight.detach().float(), group_size, self.compute_dtype)
        self._store(q, scale, zero)

    def _store(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1)
                             .to(self.compute_dtype).contiguous())

    def kernel_input(self, flat: torch.Tensor) -> torch.Tensor:
        return flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.kernel_input(x.reshape(-1, self.in_features).to(self.compute_dtype))  # (N, in)
        y = int4_mm(flat, self.weight, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class GroupInt8Linear(Int4Linear):
    """int8 weights with a scale per group, multiplied by the int4 kernel as two halves: each code
    q = 16 * hi + lo (hi in -8..7, lo in 0..15) is stored as two 4-bit codes side by side on the input
    axis, hi with scale 16 s and zero 0, lo with scale s and zero 8 s; the input is repeated to match."""

    def __init__(self, weight: torch.Tensor, group_size: int, compute_dtype=None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        self.compute_dtype = compute_dtype or compute_dtype_for(weight)
        q, scale = int8_codes(weight.detach().float(), group_size, self.compute_dtype)
        lo = q & 15  # two's complement: q = 16 * (q >> 4) + (q & 15)
        hi = (q - lo) // 16
        self._store(torch.cat([hi + 8, lo], dim=1), torch.cat([16 * scale, scale], dim=1),
                    torch.cat([torch.zeros_like(scale), 8 * scale], dim=1))

    def kernel_input(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.cat([flat, flat], dim=-1)  # (N, 2 in): one input copy per half


def check_quantize(method: Optional[str], group_size: Optional[int]) -> None:
    """Fail before loading anything: a known scheme, a group size the kernels take, and a kernel to run it."""
    if method is None:
        if group_size is not None:
            raise ArgumentError(f"--group-size {group_size} sets the quantization groups: add --quantize int8 or int4")
        return
    if method not in QUANTIZE_CHOICES:
        raise ArgumentError(f"--quantize {method}: unknown scheme; choose one of {', '.join(QUANTIZE_CHOICES)}")
    group_size = DEFAULT_GROUP_SIZE[method] if group_size is None else group_size
    allowed = GROUP_SIZES + ((0,) if method == "int8" else ())
    if group_size not in allowed:
        zero = " (int8 also takes 0: one scale per row)" if method == "int8" else ""
        raise ArgumentError(f"--group-size {group_size} for {method}: choose one of "
                            f"{', '.join(map(str, GROUP_SIZES))}{zero}")
    if group_size and not int4_kernel_available():
        raise ArgumentError(f"--quantize {method} needs torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu), "
                            f"which torch {torch.__version__} lacks: upgrade torch (>= 2.6) or use --quantize int8 "
                            "--group-size 0")


def quantized_linear(weight: torch.Tensor, method: str, group_size: int, name: str) -> nn.Module:
    """The quantized replacement of one (local) weight, after checking its shape fits the kernel."""
    if group_size == 0:
        return Int8Linear(weight)
    out_features, in_features = weight.shape
    mp = parallel.model_parallel_size()
    if in_features % group_size:
        per_rank = f" (its share on each of {mp} model-parallel ranks)" if mp > 1 else ""
        divisors = [g for g in GROUP_SIZES if in_features % g == 0]
        fix = f"use --group-size {divisors[-1]}" if divisors else "no group size divides it: drop --quantize"
        raise UserError(f"group size {group_size} does not divide {name}'s input width {in_features}{per_rank}: {fix}")
    if out_features % 16:
        raise UserError(f"{name} has {out_features} output rows; {method} needs a multiple of 16 (the int4 kernel's "
                        "packing): drop --quantize for this model")
    return (GroupInt8Linear if method == "int8" else Int4Linear)(weight, group_size)


def quantize_model(model: nn.Module, method: str = "int8", group_size: Optional[int] = None) -> nn.Module:
    """Replace every linear layer (attention, FFN and the output projection; column- and row-parallel
    ones by their rank's shard) by its quantized version, in place. The embedding table stays as it
    is: a lookup reads one row per token, not the whole table."""
    check_quantize(method, group_size)
    group_size = DEFAULT_GROUP_SIZE[method] if group_size is None else group_size
    targets = [(name, child) for name, child in model.named_modules()
               if isinstance(child, (nn.Linear,) + parallel.PARALLEL_LINEARS)]
    if not targets:
        raise ArgumentError("no linear layers to quantize")
    mp = parallel.model_parallel_size()
    if group_size == 0 and mp > 1:  # a row-parallel layer's rows are split: per-shard scales would differ
        raise UserError(f"--group-size 0 (one scale per row) works in a single process, not over {mp} model-parallel "
                        f"ranks: use a group size, e.g. --group-size {DEFAULT_GROUP_SIZE[method]}")
    device = targets[0][1].weight.device
    if group_size and device.type != "cpu":
        raise UserError(f"--quantize {method} with groups runs on the CPU here (torch's int4 kernel for {device.type} "
                        "packs differently): use --device cpu, or --quantize int8 --group-size 0")
    layers = [(name, child, quantized_linear(child.weight, method, group_size, name))
              for name, child in targets]  # every shape is checked before the model changes
    for name, child, quantized in layers:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, parallel.with_local_product(child, quantized))
    return model
