"""Losses and scores from each rank's vocabulary slice of the logits (`Transformer.logits`), never
gathering all of them: tokens x vocab x 4 bytes per rank, 4 GiB for one 8K-token sequence at Llama 3's
128,256 words. The training loss (llama/train/loop.py) and the evaluation scorer (llama/eval/scoring.py)
use them; in one process they are F.cross_entropy and argmax."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama import parallel


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


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The id of the largest logit over the whole vocabulary (N,) from this rank's slice (N, V/M):
    the first among equals, as argmax over the gathered logits would give."""
    if parallel.model_parallel_size() == 1:
        return logits.argmax(-1)
    group, per_rank = parallel.model_parallel_group(), logits.shape[-1]
    local = logits.argmax(-1)  # (N,) the first of this rank's largest
    peak = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    top = peak.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total = per_rank * parallel.model_parallel_size()
    ids = torch.where(peak == top, local + parallel.model_parallel_rank() * per_rank, total)  # (N,) global ids
    dist.all_reduce(ids, op=dist.ReduceOp.MIN, group=group)  # the lowest id among the ranks holding the top
    return ids
