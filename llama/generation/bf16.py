"""A bf16 model's products on the CPU, for generation. Decoding reads every weight once per token, so its
speed is the speed at which the weights stream from memory; torch's bf16 product at a few rows streams
them at about half what the memory delivers (Llama 3.1 8B on a 2-core EPYC: ~16 GB/s where llama.cpp's
BF16 reads ~33; docs/quantization.md). `BF16Linear` sends up to PREFILL_ROWS rows through the kernel
file's bf16_mm (csrc/bf16.h: each weight read once for up to 4 rows, widened to float32 and multiplied
in float32) and longer prefill chunks through torch's bf16 GEMM (oneDNN), which is compute-bound and
fast there. The weights stay where they are (a bf16 GGUF's are views of the mapped file)."""

import torch
import torch.nn.functional as F
from torch import nn

from llama.common.errors import UserError
from llama.generation.kernels import kernels
from llama.generation.quantize import PREFILL_ROWS, linear_layers, replace_layer


class BF16Linear(nn.Module):
    """y = x W^T, W bf16 (out, in): the kernel for a decode step's few rows, torch's GEMM for more."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > PREFILL_ROWS:
            y = F.linear(flat.to(torch.bfloat16), self.weight)
        else:
            y = torch.ops.llama_quantized.bf16_mm(flat.float().contiguous(), self.weight)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def use_bf16_kernel(model: nn.Module) -> bool:
    """Put BF16Linear in place of every linear layer (linear_layers: attention, FFN, output) of a bf16
    model on the CPU, in place; True if it did. A model in another dtype or on another device, or a
    host where the kernels cannot be built (no C++ compiler), keeps torch's products: they give the
    same numbers within float32 rounding, only slower."""
    targets = linear_layers(model)
    if not targets or any(m.weight.dtype != torch.bfloat16 or m.weight.device.type != "cpu" for _, m in targets):
        return False
    try:
        kernels()
    except UserError:
        return False
    for name, module in targets:
        replace_layer(model, name, BF16Linear(module.weight))
    return True
