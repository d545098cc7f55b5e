"""Weight-only quantization for inference: int8 and int4 weights in groups, each group with its own scale.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth, not
arithmetic: fewer bytes per weight is more tokens per second, and quantization is what fits Llama 3.1
8B (16 GB in bf16) on a 16 GB laptop. A scale per group of 32-256 input weights (as llama.cpp's Q8_0 and
Q4_0 keep one per 32) follows the weights' local size far better than one per row: an outlier spoils
only its own group. docs/quantization.md measures each choice against the fp32 model and llama.cpp.

- int8 (`GroupInt8Linear`): each group maps its largest |weight| onto 127 (absmax, as Q8_0), w = q * scale.
- int4 (`Int4Linear`): each group maps [min, max] onto the codes 0..15, w = (q - 8) * scale + zero
  (asymmetric, as llama.cpp's Q4_1), two codes per byte.
  Both products are our own kernel (llama/generation/csrc/quantized.cpp, compiled for the host on first use):
  torch has no group-wise int8 kernel, and its int4 one computes in bf16, which AVX2 CPUs have no
  instructions for. The kernel rounds the activations per block of 32 (int16 for int8 weights: no
  measurable cost; int8 for int4, as llama.cpp) and multiplies them with the codes in integers: the
  codes are all it reads, once for up to PREFILL_ROWS activation rows. A longer prefill chunk takes
  a GEMM on the weights dequantized a tile at a time (bf16 where the CPU has bf16 instructions).
- `--group-size 0` with int8 (`Int8Linear`): one scale per row through `torch._weight_int8pack_mm`,
  which inductor (compile=True) lowers to its C++ GEMM template; the least accurate scheme.
- llama.cpp's Q8_0 and Q4_0 blocks (`GGUFLinear`), as a GGUF file stores them: loading such a file
  with --quantize int8 / int4 uses its blocks as they are (a view of the file; llama/checkpoint/load.py).
The model's activations stay in floating point; only the weights are stored quantized. The codes are
computed by the kernel file's quantizers (one pass, on its threads); int8_codes / int4_codes below are
the same arithmetic in torch, the reference the tests hold them to.

Under model parallelism each rank quantizes its own shard: a row-parallel layer holds a slice of the
input features, so the group size must divide that slice (checked, one line otherwise).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llama import parallel
from llama.common.errors import ArgumentError, UserError
from llama.generation.kernels import kernels
from llama.lora import refuse_adapters

QUANTIZE_CHOICES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # multiples of the kernel's block of 32 weights
DEFAULT_GROUP_SIZE = {"int8": 64, "int4": 32}  # measured: docs/quantization.md
# The output projection (vocabulary x dim; the embedding table when tied) keeps 8 bits under int4, as
# llama.cpp keeps it at Q8_0 (or Q6_K) in its Q4_0/Q4_1 files: at 4 bits it made most of int4's error,
# enough to derail chat replies (docs/quantization.md#chat-prompts). layer_scheme applies it.
HEAD_METHOD = {"int8": "int8", "int4": "int8"}
PREFILL_ROWS = 64  # more activation rows than this: a GEMM on dequantized tiles (docs/quantization.md)
# Weights dequantized at a time for that GEMM (16 MB in fp32): 1024 rows of an 8B attention or FFN-in
# matrix, 256 of its FFN-out one. A fixed number of rows whatever the width made narrow, slow GEMMs at
# 8B (docs/quantization.md, "Prefill").
TILE_WEIGHTS = 1 << 22


def _native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


# The prefill GEMM's dtype: bf16 where the CPU multiplies bf16 natively (AVX512-BF16, AMX), where
# oneDNN's bf16 GEMM runs at ~3.5x its fp32 one; elsewhere bf16 would be emulated: fp32. Its rounding
# (bf16 activations and weights, fp32 sums) at an 8B FFN matrix, 128 rows: rms 0.24% of the output's,
# against 7.8% for 4-bit weights' own error, 0.54% for 8-bit ones' and 0.68% for llama.cpp's int8
# activations in its Q8_0 prefill (docs/quantization.md, "Prefill").
GEMM_DTYPE = torch.bfloat16 if _native_bf16() else torch.float32


def compute_dtype_for(weight: torch.Tensor) -> torch.dtype:
    """torch's int8 kernel wants activations and scales in one floating dtype. On the CPU its bf16 path is
    faster than its fp32 one, so fp32 models compute the per-row int8 product in bf16 there."""
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
        if flat.shape[0] > PREFILL_ROWS and x.dtype == torch.float32:
            # Many rows (a prefill chunk): the product is compute-bound, not bandwidth-bound, and the
            # fp32 GEMM beats the int8 kernel even after dequantizing the weight, which is one pass
            # over it (bench/quant_kernel.py times both at prefill shapes).
            y = F.linear(flat, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        else:
            y = torch._weight_int8pack_mm(flat.to(self.compute_dtype), self.weight, self.scales).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def int8_codes(w: torch.Tensor, group_size: int):
    """(out, in) floats -> int8 codes (out, in) in -127..127 and bf16 scales (out, in / group_size),
    w ~ q * scale. The codes are rounded against the stored (bf16) scale."""
    groups = w.reshape(w.shape[0], -1, group_size)  # (out, G, group)
    scale = (groups.abs().amax(-1) / 127).clamp_min(1e-12).bfloat16()
    q = torch.round(groups / scale.float()[..., None]).clamp(-127, 127)
    return q.reshape(w.shape).to(torch.int8), scale


def int4_codes(w: torch.Tensor, group_size: int):
    """(out, in) floats -> codes (out, in) in 0..15 and bf16 scales, zeros (out, in / group_size), with
    w ~ (q - 8) * scale + zero: each group's [min, max] onto 0..15, the zero its middle. The codes are
    rounded against the stored (rounded) scale and zero."""
    groups = w.reshape(w.shape[0], -1, group_size)  # (out, G, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12).bfloat16()
    zero = (lo + 8 * scale.float()).bfloat16()
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return q.reshape(w.shape).to(torch.uint8), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in / 2) bytes in the kernel's layout: in each block of 32 weights,
    byte l holds weight l in its low 4 bits and weight l + 16 in its high ones."""
    blocks = q.reshape(q.shape[0], -1, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.shape[0], -1)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4."""
    blocks = packed.reshape(packed.shape[0], -1, 16)
    return torch.stack([blocks & 15, blocks >> 4], dim=2).reshape(packed.shape[0], -1)


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the kernel's quantizers read it: float32, bf16 or fp16, each row contiguous."""
    w = weight.detach()
    w = w if w.dtype in (torch.float32, torch.bfloat16, torch.float16) else w.float()
    return w if w.dim() == 2 and w.stride(1) == 1 else w.contiguous()


class GroupLinear(nn.Module):
    """y = x W^T with W in groups of `group_size` input weights: the codes (buffer `weight`) and a scale
    per group, multiplied by the group-wise kernel (llama/generation/csrc/quantized.cpp)."""

    def __init__(self, out_features: int, in_features: int, group_size: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.group_size = group_size
        kernels()  # built and loaded: torch.ops.llama_quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()  # (N, in)
        if flat.shape[0] > PREFILL_ROWS:
            # Compute-bound (a long prefill chunk): a GEMM on the weights dequantized a tile at a time
            # (dequantizing a whole 8B FFN matrix would write 235 MB of fresh memory per product).
            rows, dtype = max(64, TILE_WEIGHTS // self.in_features // 64 * 64), self.gemm_dtype()
            inputs = flat.to(dtype)
            y = torch.cat([F.linear(inputs, self.dequantized(start, start + rows, dtype))
                           for start in range(0, self.out_features, rows)], dim=1).float()
        else:
            y = self.product(flat)  # the kernel: each weight read once for all the rows
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def gemm_dtype(self) -> torch.dtype:
        return GEMM_DTYPE


class GroupInt8Linear(GroupLinear):
    """int8 codes (out, in), w = q * scale."""

    def __init__(self, weight: torch.Tensor, group_size: int):
        """`weight` (out, in), quantized; one on the `meta` device gives the layer's shape only (`fill`)."""
        super().__init__(*weight.shape, group_size)
        self.register_buffer("weight", torch.empty(weight.shape, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(weight.shape[0], weight.shape[1] // group_size, dtype=torch.bfloat16))
        if not weight.is_meta:
            self.fill(0, weight)

    def fill(self, start: int, rows: torch.Tensor) -> None:
        """Quantize `rows` (n, in) into rows [start, start + n): int8_codes, in one pass."""
        end = start + rows.shape[0]
        kernels().int8_quantize(_rows(rows), self.group_size, self.weight[start:end], self.scales[start:end])

    def product(self, x: torch.Tensor, simd: bool = True) -> torch.Tensor:
        return torch.ops.llama_quantized.int8_mm(x, self.weight, self.scales, self.group_size, simd)

    def dequantized(self, start: int = 0, end: Optional[int] = None, dtype=torch.float32) -> torch.Tensor:
        """Rows [start, end) of the weight, float32 or bf16 (rounded to nearest)."""
        return torch.ops.llama_quantized.int8_dequantize(self.weight[start:end], self.scales[start:end], self.group_size,
                                                         dtype == torch.bfloat16)


class Int4Linear(GroupLinear):
    """4-bit codes packed two per byte (out, in / 2: `pack_int4`), w = (q - 8) * scale + zero."""

    def __init__(self, weight: torch.Tensor, group_size: int):
        super().__init__(*weight.shape, group_size)
        out, groups = weight.shape[0], weight.shape[1] // group_size
        self.register_buffer("weight", torch.empty(out, weight.shape[1] // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out, groups, dtype=torch.bfloat16))
        self.register_buffer("zeros", torch.empty(out, groups, dtype=torch.bfloat16))
        if not weight.is_meta:
            self.fill(0, weight)

    def fill(self, start: int, rows: torch.Tensor) -> None:
        """pack_int4(int4_codes(rows)) into rows [start, start + n), in one pass."""
        end = start + rows.shape[0]
        kernels().int4_quantize(_rows(rows), self.group_size, self.weight[start:end], self.scales[start:end],
                                self.zeros[start:end])

    def product(self, x: torch.Tensor, simd: bool = True) -> torch.Tensor:
        """x (rows, in) float32 -> (rows, out); simd=False: the portable loops a CPU without AVX2 runs."""
        return torch.ops.llama_quantized.int4_mm(x, self.weight, self.scales, self.zeros, self.group_size, simd)

    def dequantized(self, start: int = 0, end: Optional[int] = None, dtype=torch.float32) -> torch.Tensor:
        return torch.ops.llama_quantized.int4_dequantize(self.weight[start:end], self.scales[start:end],
                                                         self.zeros[start:end], self.group_size, dtype == torch.bfloat16)


# GGUF types the kernel file reads (ggml's type ids): Q8_0 and Q4_0 multiplied as they are (GGUFLinear),
# all of them dequantized fast when loading into another layout (csrc/kquants.h).
GGUF_TYPE_IDS = {"Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def dequantize_gguf(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """GGUF blocks uint8 (rows, blocks per row, bytes per block) of a type in GGUF_TYPE_IDS -> float32
    (rows, columns), as llama.cpp dequantizes them."""
    return kernels().gguf_dequantize(blocks, GGUF_TYPE_IDS[kind])


class GGUFLinear(GroupLinear):
    """llama.cpp's Q8_0 or Q4_0 blocks as a GGUF file stores them, uint8 (out, in / 32, bytes per block):
    each block of 32 weights is an fp16 scale d and its codes, w = code * d (Q8_0: int8 codes) or
    (code - 8) * d (Q4_0: codes 0..15, in the int4 layout). Usually a view of the file's bytes."""

    def __init__(self, blocks: torch.Tensor, kind: str):
        super().__init__(blocks.shape[0], blocks.shape[1] * 32, 32)
        self.kind, self.kind_id = kind, GGUF_TYPE_IDS[kind]
        self.register_buffer("weight", blocks)

    def product(self, x: torch.Tensor, simd: bool = True) -> torch.Tensor:
        return torch.ops.llama_quantized.gguf_mm(x, self.weight, self.kind_id, simd)

    def dequantized(self, start: int = 0, end: Optional[int] = None, dtype=torch.float32) -> torch.Tensor:
        return torch.ops.llama_quantized.gguf_dequantize(self.weight[start:end], self.kind_id, dtype == torch.bfloat16)


class GGUFEmbedding(nn.Module):
    """The token embedding table kept in a GGUF file's blocks (a view of the file), each looked-up row
    dequantized to the model's dtype: a lookup reads one row per token, so the table costs its size in
    the file (Llama 3.1 8B, Q4_0: 0.28 GB) instead of 2.1 GB in fp32, and nothing per step."""

    def __init__(self, blocks: torch.Tensor, kind: str, dim: int, dtype: torch.dtype):
        super().__init__()
        kernels()
        self.kind_id, self.dim, self.dtype = GGUF_TYPE_IDS[kind], dim, dtype
        self.register_buffer("table", blocks)  # (vocab, blocks per row, bytes per block)

    @property
    def weight(self) -> torch.Tensor:
        """What callers read of an embedding's weight, its dtype and device (the KV cache is made in
        them: Transformer.make_cache): an empty tensor of the rows this table gives."""
        return torch.empty(0, dtype=self.dtype, device=self.table.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.llama_quantized.gguf_dequantize(self.table[tokens.reshape(-1)], self.kind_id)  # (n, dim)
        return rows.to(self.dtype).view(*tokens.shape, self.dim)


def check_quantize(method: Optional[str], group_size: Optional[int]) -> None:
    """Fail before loading anything: a known scheme, a group size the kernels take, and a kernel to run it
    (the group-wise kernels are built here, once per host)."""
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
    if group_size:
        kernels()


def quantized_linear(weight: torch.Tensor, method: str, group_size: int, name: str) -> nn.Module:
    """The quantized replacement of one (local) weight, after checking its shape fits the kernel."""
    if group_size == 0:
        return Int8Linear(weight)
    in_features = weight.shape[1]
    mp = parallel.model_parallel_size()
    if in_features % group_size:
        per_rank = f" (its share on each of {mp} model-parallel ranks)" if mp > 1 else ""
        divisors = [g for g in GROUP_SIZES if in_features % g == 0]
        fix = f"use --group-size {divisors[-1]}" if divisors else "no group size divides it: drop --quantize"
        raise UserError(f"group size {group_size} does not divide {name}'s input width {in_features}{per_rank}: {fix}")
    return (GroupInt8Linear if method == "int8" else Int4Linear)(weight, group_size)


ROWS_AT_ONCE = 1 << 24  # weights quantized per piece when loading: the float piece is transient


def quantize_rows(read, shape, method: str, group_size: int, name: str) -> nn.Module:
    """quantized_linear of a (out, in) weight read a block of rows at a time (`read(start, end)` -> those
    rows, in any float dtype): every scheme quantizes each row on its own, so the pieces' codes and
    scales, stacked, are the whole weight's. A checkpoint's weights then never exist in float all at
    once, nor even one large matrix of them (the 8B output matrix is 2.1 GB in fp32)."""
    out, in_features = shape
    step = max(1, ROWS_AT_ONCE // in_features)
    if group_size == 0:  # one scale per row (torch's int8 layout): stack the pieces' rows
        pieces = [Int8Linear(read(start, min(start + step, out))) for start in range(0, out, step)]
        layer = pieces[0]
        for key in ("weight", "scales"):
            setattr(layer, key, torch.cat([getattr(piece, key) for piece in pieces]))
        layer.out_features = out
        return layer
    layer = quantized_linear(torch.empty(shape, device="meta"), method, group_size, name)  # checks, allocates
    for start in range(0, out, step):
        layer.fill(start, read(start, min(start + step, out)))
    return layer


def native_kind(method: str, group_size: Optional[int]) -> Optional[str]:
    """The llama.cpp block type (GGUFLinear) that `--quantize method --group-size group_size` takes as it
    is from a GGUF file: Q4_0 for int4, Q8_0 for int8, each with groups of 32 (the default group size
    too: the file's own blocks lose nothing and are read in place, where requantizing them to ours
    would round twice)."""
    if group_size in (None, 32):
        return {"int4": "Q4_0", "int8": "Q8_0"}.get(method)
    return None


def layer_scheme(name: str, method: str, group_size: Optional[int]) -> Tuple[str, Optional[int]]:
    """(method, group size) of the linear layer `name` under --quantize method --group-size group_size:
    the output projection takes HEAD_METHOD, in groups of the body's size (None stays None where the
    method is the body's: a GGUF file's own blocks, else the default)."""
    if name != "output" or HEAD_METHOD[method] == method:
        return method, group_size
    return HEAD_METHOD[method], DEFAULT_GROUP_SIZE[method] if group_size is None else group_size


def linear_layers(model: nn.Module):
    """[(name, module)] of every linear layer quantization replaces: attention, FFN and the output
    projection (column- and row-parallel ones by their rank's shard). The embedding table stays as it
    is: a lookup reads one row per token, not the whole table."""
    return [(name, child) for name, child in model.named_modules()
            if isinstance(child, (nn.Linear,) + parallel.PARALLEL_LINEARS)]


def check_target(method: str, group_size: Optional[int], device) -> None:
    """Where a quantized model can run: one scale per row only in one process; groups on the CPU."""
    group_size = DEFAULT_GROUP_SIZE[method] if group_size is None else group_size
    mp = parallel.model_parallel_size()
    if group_size == 0 and mp > 1:  # a row-parallel layer's rows are split: per-shard scales would differ
        raise UserError(f"--group-size 0 (one scale per row) works in a single process, not over {mp} model-parallel "
                        f"ranks: use a group size, e.g. --group-size {DEFAULT_GROUP_SIZE[method]}")
    device = torch.device(device if device is not None else "cpu")
    if group_size and device.type != "cpu":
        raise UserError(f"--quantize {method} with groups runs on the CPU (its kernel is C++ for the CPU), not "
                        f"{device.type}: use --device cpu, or --quantize int8 --group-size 0")


def replace_layer(model: nn.Module, name: str, quantized: nn.Module) -> None:
    """Put `quantized` where the linear layer `name` is (wrapped for a parallel one: LocalProduct)."""
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, attr, parallel.with_local_product(getattr(owner, attr), quantized))


def quantize_model(model: nn.Module, method: str = "int8", group_size: Optional[int] = None) -> nn.Module:
    """Replace every linear layer (linear_layers) by its quantized version, in place. Loading a
    checkpoint straight into the quantized model (load_model(..., quantize=...)) never holds its float
    weights; this is for a model already in memory."""
    check_quantize(method, group_size)
    refuse_adapters(model, f"quantizing to {method}")  # A, B would be quantized as layers, W without them
    group_size = DEFAULT_GROUP_SIZE[method] if group_size is None else group_size
    targets = linear_layers(model)
    if not targets:
        raise ArgumentError("no linear layers to quantize")
    check_target(method, group_size, targets[0][1].weight.device)
    layers = [(name, quantized_linear(child.weight, *layer_scheme(name, method, group_size), name))
              for name, child in targets]  # every shape is checked before the model changes
    for name, quantized in layers:
        replace_layer(model, name, quantized)
    return model
