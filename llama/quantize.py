"""Weight-only int8 quantization for inference: a quarter of fp32's bytes to read per token.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth, not
arithmetic: storing weights as int8 (plus one scale per output row) cuts the bytes 4x versus fp32.
Each row is scaled symmetrically so its largest |weight| maps to 127 (absmax, as in LLM.int8 and
llama.cpp's Q8_0, which uses one scale per block of 32 instead of per row).
The matmul is torch's own int8 kernel, `torch._weight_int8pack_mm` (y = x @ (W_int8 * scale)^T);
it dequantizes on the fly, so activations keep their precision. Under compile=True (generation.py)
inductor lowers the same op to its C++ GEMM template, which reads the int8 weights directly and
uses both threads: ~2.6-2.8x the eager int8 decode speed on the 2-core machine of the README.
A prefill chunk is different: with hundreds of rows the product is compute-bound, so there the
weight is dequantized and multiplied by the fp32 GEMM (512-token prefill: 525 vs 310 tok/s).
"""

import torch
import torch.nn.functional as F
from torch import nn

from llama import parallel
from llama.errors import ArgumentError, UserError

QUANTIZE_CHOICES = ("int8",)


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 rows (out, in) and per-row scales (out,)."""

    def __init__(self, weight: torch.Tensor, compute_dtype=None):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        # The int8 kernel wants activations and scales in one floating dtype. On the CPU its bf16
        # path is several times faster than its fp32 one (8192x4096 matvec, 1 AVX2 core: 9 ms vs
        # 73 ms), so fp32 models compute these products with bf16 activations there.
        if compute_dtype is None:
            cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
            compute_dtype = torch.bfloat16 if cpu_fp32 else weight.dtype
        self.compute_dtype = compute_dtype
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


def quantize_model(model: nn.Module, method: str = "int8", compute_dtype=None) -> nn.Module:
    """Replace every nn.Linear (attention, FFN and the output projection) by an Int8Linear, in place.
    The embedding table stays as it is: a lookup reads one row per token, not the whole table."""
    if method not in QUANTIZE_CHOICES:
        raise ArgumentError(f"quantize={method!r} is not supported: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if parallel.model_parallel_size() > 1:  # the column/row-parallel layers have no int8 product
        raise UserError(f"quantize={method!r} works in a single process, not over {parallel.model_parallel_size()} "
                        "model-parallel ranks: run without torchrun, or drop --quantize")
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if not targets:
        raise ArgumentError("no nn.Linear layers to quantize: int8 works on a single-process model "
                         "(model-parallel layers are not supported)")
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child.weight, compute_dtype))
    return model
