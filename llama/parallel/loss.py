"""The training loss under model parallelism: cross-entropy from each rank's vocabulary slice of the
logits, never gathering all of them (llama/train/loop.py uses it; one process: F.cross_entropy)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llama import parallel


def keep_logits_split(model: nn.Module) -> None:
    """Training: make the output layer return this rank's vocabulary slice of the logits instead of
    gathering all of them (tokens x vocab x 4 bytes per rank: 4 GiB for one 8K-token sequence at
    Llama 3's 128,256 words). vocab_parallel_cross_entropy takes the slice. Inference models (built
    by load_model / Llama.build) keep gathering."""
    if isinstance(model.output, parallel.ColumnParallelLinear):
        model.output.gather_output = False


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """-log softmax(z)[t] from column slices of z: the max and the sum of exponentials are
    all-reduced over the model-parallel group; the target's logit comes from the rank that owns it
    (Megatron-LM's cross-entropy, Shoeybi et al., 2019)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        # logits (N, V/M) float32: this rank's columns [start, start + V/M); targets (N,) global ids
        group, per_rank = parallel.model_parallel_group(), logits.shape[-1]
        start = parallel.model_parallel_rank() * per_rank
        peak = logits.max(dim=-1).values  # (N,) for a stable exp
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - peak.unsqueeze(-1)).exp_()  # (N, V/M)
        local = targets - start
        owned = (local >= 0) & (local < per_rank)  # ignore_index (< 0) is owned by no rank
        local = local.masked_fill(~owned, 0)
        target_logit = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1) - peak  # (N,)
        target_logit = target_logit.masked_fill(~owned, 0.0)
        sum_exp = exp.sum(dim=-1)
        both = torch.stack([sum_exp, target_logit])  # (2, N): one all-reduce for the two sums
        dist.all_reduce(both, group=group)
        sum_exp, target_logit = both[0], both[1]
        valid = targets != ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)  # (N,)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax slice, kept for backward
        ctx.save_for_backward(exp, local, owned, valid)
        return loss

    @staticmethod
    def backward(ctx, grad):
        # d loss_i / d z_ij = softmax_ij - [j == t_i]: each rank's slice, no communication
        softmax, local, owned, valid = ctx.saved_tensors
        rows = torch.arange(softmax.shape[0], device=softmax.device)
        grad_logits = softmax.clone()
        grad_logits[rows, local] -= owned.to(softmax.dtype)
        grad_logits.mul_((grad * valid).unsqueeze(-1))
        return grad_logits, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy (N,) from this rank's vocabulary slice of the logits (N, V/M);
    targets equal to ignore_index give 0. One process: F.cross_entropy on the full logits."""
    if parallel.model_parallel_size() == 1:
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")
    return _VocabParallelCrossEntropy.apply(logits.float(), targets, ignore_index)
