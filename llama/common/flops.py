"""Model FLOPs per token and the GPU datasheet table: the one count and the one table that the
planner (llama/plan.py) and the training metrics (llama/train/metrics.py, MFU) both use.

The convention is PaLM's (Chowdhery et al., 2022, appendix B): a training token costs
    6 N  +  12 L H Dh T
N = the weights that take part in a matrix multiply (2N forward, 4N backward; Kaplan et al., 2020);
the second term is attention's two products, QK^T and the weighted sum of V (2 FLOPs per
multiply-add, x3 for backward), over the whole T x T square. The causal mask makes half of that
square dead work that a flash kernel skips, so 6 L H Dh T would be the FLOPs actually needed; we
count the full square anyway because it is the convention published MFU figures use (PaLM,
torchtitan, nanoGPT): an MFU reported here, or a --mfu given to the planner from such a report,
then means the same thing. Recomputation under activation checkpointing is not model FLOPs.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from llama.model import ModelArgs


@dataclass(frozen=True)
class GPU:
    name: str  # the planner's --gpu name
    cuda_name: str  # matched against torch.cuda.get_device_name() (the longest match wins)
    memory_gib: float  # the datasheet figure; nvidia-smi reports about this many GiB
    bf16_tflops: float  # dense (no 2:4 sparsity) bf16 tensor-core peak
    bandwidth_tbs: float  # memory bandwidth, 1e12 bytes/s


# Published datasheet figures (SXM parts unless named otherwise).
GPUS = {
    g.name: g
    for g in [
        GPU("gb200", "GB200", 186, 2500, 8.0),
        GPU("b200", "B200", 180, 2250, 8.0),
        GPU("b100", "B100", 180, 1750, 8.0),
        GPU("h200", "H200", 141, 989, 4.8),
        GPU("gh200", "GH200", 96, 989, 4.0),
        GPU("h100", "H100", 80, 989, 3.35),
        GPU("h100-nvl", "H100 NVL", 94, 835, 3.9),
        GPU("h100-pcie", "H100 PCIe", 80, 756, 2.0),
        GPU("h800", "H800", 80, 989, 3.35),
        GPU("a100", "A100", 80, 312, 2.039),
        GPU("a100-40gb", "A100-SXM4-40GB", 40, 312, 1.555),
        GPU("a800", "A800", 80, 312, 2.039),
        GPU("l40s", "L40S", 48, 362, 0.864),
        GPU("l40", "L40", 48, 181, 0.864),
        GPU("l4", "L4", 24, 121, 0.3),
        GPU("a10g", "A10G", 24, 70, 0.6),
        GPU("a10", "A10", 24, 125, 0.6),
        GPU("rtx4090", "RTX 4090", 24, 165, 1.008),
        GPU("rtx3090", "RTX 3090", 24, 71, 0.936),
        GPU("rtx-a6000", "A6000", 48, 155, 0.768),
        GPU("mi300x", "MI300X", 192, 1307, 5.3),
        GPU("mi250x", "MI250X", 128, 383, 3.2768),
    ]
}


def matmul_params(args: ModelArgs) -> int:
    """Weights that take part in a matrix multiply, counted from the shape (full model, all ranks).
    The embedding lookup costs nothing; the output layer is a matmul even when tied to it."""
    q = args.n_heads * args.head_dim
    kv = args.n_kv_heads * args.head_dim
    attention = args.dim * (2 * q + 2 * kv)  # wq, wo (D x H*Dh) and wk, wv (D x K*Dh)
    ffn = 3 * args.dim * args.ffn_hidden_dim  # w1, w2, w3
    return args.n_layers * (attention + ffn) + args.dim * args.vocab_size


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token of a seq_len-token sequence: 6N + 12*L*H*Dh*T
    (PaLM's convention: see the top of this file). A forward pass alone is a third of it."""
    return float(6 * matmul_params(args) + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len)


def gpu_by_cuda_name(device_name: str) -> Optional[GPU]:
    """The table's entry for a torch.cuda.get_device_name() string, or None if it is not listed.
    The longest matching name wins: "NVIDIA H100 PCIe" is the PCIe part, not the SXM one."""
    matches = [g for g in GPUS.values() if g.cuda_name in device_name]
    return max(matches, key=lambda g: len(g.cuda_name), default=None)


def peak_tflops(device: torch.device, override: float = 0.0) -> Optional[float]:
    """The device's bf16 peak, or None where unknown (CPUs: report achieved TFLOP/s instead)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    gpu = gpu_by_cuda_name(torch.cuda.get_device_name(device))
    return gpu.bf16_tflops if gpu else None
