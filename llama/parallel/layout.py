"""How a Llama splits over M model-parallel ranks, as arithmetic on shapes and names (no process groups):
which dimension of each tensor is split (`SHARD_DIM`), what must divide by M, and which K/V heads each
rank holds when there are more ranks than K/V heads. llama/parallel/__init__.py applies it to the
layers, the shards and the process groups; its names are re-exported there (parallel.SHARD_DIM, ...)."""

from typing import Optional

import torch

from llama.common.errors import UserError

# Dimension along which each parameter (matched by name suffix) is split across model-parallel
# ranks; None means every rank holds a full copy. Weights are (out_features, in_features).
SHARD_DIM = {
    "tok_embeddings.weight": 0,  # vocab-parallel (Llama 2 checkpoints used dim 1: llama/checkpoint/load.py re-splits them)
    "attention.wq.weight": 0,  # column-parallel: heads are split
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,  # row-parallel
    "feed_forward.w1.weight": 0,  # column-parallel: hidden units are split
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,  # row-parallel
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,  # column-parallel over the vocabulary: the loss takes the slices, logits gather them
    # LoRA adapters (llama/lora.py): a column-parallel W's A is replicated and its B split on the
    # output rows; a row-parallel W's A is split on the input columns and its B replicated.
    "attention.wq.lora_A.weight": None, "attention.wq.lora_B.weight": 0,
    "attention.wk.lora_A.weight": None, "attention.wk.lora_B.weight": 0,
    "attention.wv.lora_A.weight": None, "attention.wv.lora_B.weight": 0,
    "attention.wo.lora_A.weight": 1, "attention.wo.lora_B.weight": None,
    "feed_forward.w1.lora_A.weight": None, "feed_forward.w1.lora_B.weight": 0,
    "feed_forward.w3.lora_A.weight": None, "feed_forward.w3.lora_B.weight": 0,
    "feed_forward.w2.lora_A.weight": 1, "feed_forward.w2.lora_B.weight": None,
}


def shard_dim(name: str) -> Optional[int]:
    """The split dimension of a state-dict key such as 'layers.3.attention.wq.weight'."""
    for suffix, dim in SHARD_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    raise KeyError(f"{name!r} is not a Llama parameter name (see llama/parallel/layout.py SHARD_DIM)")


# ---------------------------------------------------------------------------- what must divide


class ParallelError(UserError):
    """A model shape that cannot be split over the requested model-parallel size."""


def check_divisible(what: str, value: int, mp: int) -> None:
    if value % mp != 0:
        raise ParallelError(f"{what}={value} is not divisible by the model-parallel size {mp}: "
                            f"use a model-parallel size that divides it")


# ---------------------------------------------------------------------------- the K/V-head rule


def kv_heads_for(n_kv_heads: int, mp: int) -> int:
    """How many K/V heads the model holds when split over `mp` ranks: n_kv_heads itself, or, with
    more ranks than K/V heads, one per rank: each rank keeps a copy of the K/V head its query heads
    share (Meta's 405B MP16 release stores its 8 K/V heads as 16 this way)."""
    return max(n_kv_heads, mp)


def kv_heads_duplicated(n_kv_heads: int, mp: int) -> bool:
    """More model-parallel ranks than K/V heads: some head is held by several ranks. Training refuses
    it (check_model_parallel, LoRA's wk/wv adapters): each copy would get only its own queries'
    gradients and the copies would drift apart."""
    return mp > n_kv_heads


def check_model_parallel(args, mp: int, training: bool = False, flag: Optional[str] = None) -> int:
    """The rules for splitting `args` (a ModelArgs) over `mp` ranks, in one place: query heads, K/V
    heads (after duplication), FFN units and the vocabulary must divide evenly. Training also refuses
    duplicated K/V heads: each copy would get only its own queries' gradients and drift apart.
    `flag` is how the caller's user spells the size ("--mp ", "model_parallel_size="). Returns
    kv_heads_for(n_kv_heads, mp); raises ParallelError naming the rule and the fix."""
    size = f"{flag}{mp}" if flag else f"model-parallel size {mp}"
    if mp < 1:
        raise ParallelError(f"{size}: must be at least 1")
    n_kv = args.n_kv_heads or args.n_heads
    kv = kv_heads_for(n_kv, mp)
    _check_divides(size, "n_heads", args.n_heads, mp, flag)
    if kv_heads_duplicated(n_kv, mp) and mp % n_kv != 0:
        raise ParallelError(f"{size} is more than n_kv_heads={n_kv} but not a multiple of it: "
                            f"use a divisor or a multiple of {n_kv}")
    if training and kv_heads_duplicated(n_kv, mp):
        raise ParallelError(f"{size} exceeds n_kv_heads={n_kv}: training needs each K/V head on one rank "
                            f"(copies would drift apart): use at most {n_kv}")
    for what, value in [("n_kv_heads", kv), ("the FFN width", args.ffn_hidden_dim), ("vocab_size", args.vocab_size)]:
        _check_divides(size, what, value, mp, flag)
    return kv


def _check_divides(size: str, what: str, value: int, mp: int, flag: Optional[str]) -> None:
    if value % mp != 0 and flag:
        raise ParallelError(f"{size} does not divide {what}={value}: pick one that divides it")
    check_divisible(what, value, mp)


def local_kv_heads(n_kv_heads: int, mp: int, rank: int) -> list:
    """The K/V heads (0 .. n_kv_heads - 1) that model-parallel rank `rank` holds, in order: its share
    of kv_heads_for(n_kv_heads, mp) heads, each head repeated for the ranks whose queries share it.
    The one rule for wk/wv and their LoRA B, whether cut from a full tensor (shard) or from a
    checkpoint's shards (llama/checkpoint/load.py)."""
    target = kv_heads_for(n_kv_heads, mp)
    per_rank, copies = target // mp, target // n_kv_heads
    return [j // copies for j in range(rank * per_rank, (rank + 1) * per_rank)]


def repeat_kv_heads(full: torch.Tensor, n_kv_heads: int, mp: int) -> torch.Tensor:
    """wk/wv (n_kv_heads*Dh, D) -> (kv_heads_for*Dh, D): every rank's heads (local_kv_heads) in rank order,
    so that chunking the result over mp ranks gives every rank the heads its queries use."""
    heads = full.view(n_kv_heads, -1, full.shape[-1])  # (K, Dh, D)
    order = [h for rank in range(mp) for h in local_kv_heads(n_kv_heads, mp, rank)]
    return heads[order].reshape(-1, full.shape[-1])
