"""Long sequences: packed documents and context parallelism (the Llama 3 paper, section 3.3.2).

Document masks. Several documents share a row; each token's RoPE position restarts at its document's
first token, and a token attends only to the earlier tokens of its own document. Both follow from the
positions alone: token j's document starts at j - pos[j], so tokens i >= j share a document exactly when
i - pos[i] == j - pos[j]. A packed batch therefore carries positions (B, T) beside its tokens
(llama/train/batches.py) and the mask is built from them here.

Context parallelism (`context_parallel_size = N`: N ranks share every sequence):
  - the sequence is cut into 2N chunks and rank r holds chunks r and 2N-1-r (a head and a tail), so each
    rank has the same causal work: an early chunk attends to little, a late one to much;
  - each layer all-gathers K and V over the context-parallel group, in the sequence's global order
    (`KVExchange`, in the place of a KV cache: llama/model.py needs no code of its own for it); its
    backward reduce-scatters dK and dV, so each rank gets the gradient of every rank's loss;
  - the causal and document mask comes from global indices and positions (`DocumentMask`);
  - every context-parallel rank holds the same weights: gradients are averaged over data x context
    parallel ranks (`parallel.dp_cp_group`) and the loss is summed over both.
K and V are small next to the rest (8B: 8 K/V heads of 32, one per rank at model parallel 8), which is
why gathering them whole is affordable where gathering the activations would not be.

`DocumentMask` is what Attention passes to scaled_dot_product_attention as its mask. It answers that
call itself (torch's `__torch_function__` protocol, as torch.nn.attention.bias.CausalBias does): per run
of consecutive query tokens, it attends to the keys from the run's earliest document start to the run's
end only, as a lower-right causal triangle when no document boundary falls there (CUDA: no mask is
materialised) or else with a boolean block mask. `dense()` is the same mask as one tensor (tests).
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.utils.checkpoint
import torch.nn.functional as F

from llama import parallel


def chunk_indices(T: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global indices (2T/2cp,) of rank's tokens: chunks rank and 2cp-1-rank of 2cp equal chunks."""
    L = T // (2 * cp)
    head = torch.arange(rank * L, (rank + 1) * L, device=device)
    return torch.cat([head, head + (2 * cp - 1 - 2 * rank) * L])


def _global_order(pieces: List[torch.Tensor]) -> torch.Tensor:
    """Every rank's (.., 2L, ..) pieces (dim 2: tokens), head and tail, put back in sequence order."""
    heads = [p.chunk(2, dim=2)[0] for p in pieces]
    tails = [p.chunk(2, dim=2)[1] for p in reversed(pieces)]
    return torch.cat(heads + tails, dim=2)


class _GatherKV(torch.autograd.Function):
    """Forward: this rank's (B, 2K, T_local, Dh) -> every rank's, in global order (B, 2K, T, Dh).
    Backward: the gradient's pieces of each rank's tokens, summed over the ranks (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        cp = dist.get_world_size(group)
        pieces = [torch.empty_like(kv) for _ in range(cp)]
        dist.all_gather(pieces, kv.contiguous(), group=group)
        return _global_order(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        chunks = grad.chunk(2 * cp, dim=2)
        mine = [torch.cat([chunks[r], chunks[2 * cp - 1 - r]], dim=2).contiguous() for r in range(cp)]
        if dist.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter: sum everything, keep ours
            total = torch.stack(mine)
            dist.all_reduce(total, group=ctx.group)
            return total[rank], None
        out = torch.empty_like(mine[rank])
        dist.reduce_scatter(out, mine, group=ctx.group)
        return out, None


class KVExchange:
    """Every layer's stand-in for a KV cache under context parallelism: update(start_pos, k, v) returns
    all ranks' keys and values (B, K_local, T, Dh) in the sequence's order. Stateless, so one object
    serves every layer (cache[i] is itself)."""

    def __init__(self, group=None):
        self.group = group if group is not None else parallel.context_parallel_group()

    def __getitem__(self, layer: int) -> "KVExchange":
        return self

    def update(self, start_pos, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        kv = _GatherKV.apply(torch.cat([k, v], dim=1), self.group)  # one collective for both: (B, 2K, T, Dh)
        return kv.chunk(2, dim=1)


class DocumentMask:
    """Causal attention within documents for queries at global indices q_index (T_q,) over the keys of
    the whole sequence, whose positions are `positions` (B, S). Each row's queries are cut into blocks,
    one per run of consecutive indices within one document: a block attends to its document's keys up to
    its last query, a lower-right causal triangle (only the work a document's own triangle needs)."""

    def __init__(self, q_index: torch.Tensor, positions: torch.Tensor):
        self.q_index = q_index
        S = positions.shape[1]
        self.doc = (torch.arange(S, device=positions.device) - positions).clamp(min=0)  # (B, S) document starts
        q_doc = self.doc[:, q_index]  # (B, T_q)
        # a block starts where the index jumps (context-parallel chunks) or the document changes
        jump = torch.ones_like(q_index, dtype=torch.bool)
        jump[1:] = q_index[1:] != q_index[:-1] + 1
        new = jump | torch.cat([torch.ones_like(q_doc[:, :1], dtype=torch.bool), q_doc[:, 1:] != q_doc[:, :-1]], 1)
        self.blocks = []  # per row: (query rows l0:l1, key columns k0:k1)
        for b in range(positions.shape[0]):
            starts = torch.nonzero(new[b]).flatten().tolist() + [len(q_index)]
            self.blocks.append([(l0, l1, int(q_doc[b, l0]), int(q_index[l1 - 1]) + 1) for l0, l1 in zip(starts, starts[1:])])

    def dense(self) -> torch.Tensor:
        """The whole mask (B, 1, T_q, S): True where a query may attend to a key."""
        k = torch.arange(self.doc.shape[1], device=self.doc.device)
        same = self.doc[:, self.q_index, None] == self.doc[:, None, :]
        return (same & (k <= self.q_index[:, None])).unsqueeze(1)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return NotImplemented
        kwargs = dict(kwargs or {})
        mask = kwargs.pop("attn_mask")
        if kwargs.pop("is_causal", False):
            raise ValueError("a DocumentMask is the causal mask: pass is_causal=False")
        return mask.attend(*args, **kwargs)

    def attend(self, q, k, v, dropout_p: float = 0.0, scale: Optional[float] = None, enable_gqa: bool = False):
        """(B, H, T_q, Dh) from q and K/V (B, K, S, Dh), block by block (rows with one layout: together)."""
        kw = dict(dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
        if all(blocks == self.blocks[0] for blocks in self.blocks):
            return _row(q, k, v, self.blocks[0], kw)
        return torch.cat([_row(*qkv, blocks, kw) for *qkv, blocks in zip(q.split(1), k.split(1), v.split(1), self.blocks)])


def _row(q, k, v, blocks, kw) -> torch.Tensor:
    """Attention of one row's (or same-layout rows') query blocks, each over its keys k0:k1. Taken by split,
    not by slicing: a slice's backward writes a zero tensor the size of its whole input per block (with
    dozens of documents a row, a third of the attention's time), a split's one concatenation. The keys split
    as the queries where the blocks tile them (one rank); context-parallel blocks share keys: sliced."""
    sizes = [l1 - l0 for l0, l1, _, _ in blocks]
    if k.shape[2] == q.shape[2] and all(k0 == l0 and k1 == l1 for l0, l1, k0, k1 in blocks):
        pieces = zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2))
    else:
        pieces = ((qb, k[:, :, k0:k1], v[:, :, k0:k1]) for qb, (*_, k0, k1) in zip(q.split(sizes, dim=2), blocks))
    return torch.cat([_lower_right(qb, kb, vb, dict(kw)) for qb, kb, vb in pieces], dim=2)


def _lower_right(q, k, v, kw) -> torch.Tensor:
    """Causal attention of the last Lq of Lk positions: query i sees keys up to Lk - Lq + i. Square: SDPA's
    own causal path. On CUDA, torch's CausalBias runs it in the flash/efficient kernels without a mask
    (they take no GQA: K/V heads repeated); elsewhere a boolean triangle, recomputed in backward."""
    Lq, Lk = q.shape[2], k.shape[2]
    if Lq == Lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    if q.device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        if kw.pop("enable_gqa") and k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), **kw)
    # SDPA on the CPU turns a boolean mask into a float one (Lq, Lk) and saves it for backward: 4 bytes
    # per query and key, more than the block's activations. Recomputed in backward instead.
    return torch.utils.checkpoint.checkpoint(_triangle, q, k, v, kw, use_reentrant=False)


def _triangle(q, k, v, kw) -> torch.Tensor:
    Lq, Lk = q.shape[2], k.shape[2]
    tri = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=tri, **kw)


def token_index(T: int) -> Optional[torch.Tensor]:
    """Global indices of this rank's tokens of a (.., T) micro-batch after `shard_batch`'s padding; None
    with one context-parallel rank (every token, in order)."""
    cp = parallel.context_parallel_size()
    return chunk_indices(T + (-T) % (2 * cp), cp, parallel.context_parallel_rank()) if cp > 1 else None


def shard_batch(inputs: torch.Tensor, targets: torch.Tensor, positions: Optional[torch.Tensor], ignore_index: int):
    """(this rank's inputs, its targets, the model's keyword arguments for them) of a micro-batch (B, T).
    positions (B, T): packed documents (None: one sequence per row). One rank, no packing: as given,
    no arguments (the model's causal path). Under context parallelism the row is padded to a multiple of
    2 x CP (targets ignore_index: not trained) and this rank keeps its head and tail chunks."""
    cp, rank = parallel.context_parallel_size(), parallel.context_parallel_rank()
    if cp == 1 and positions is None:
        return inputs, targets, {}
    B, T = inputs.shape
    pad = (-T) % (2 * cp) if cp > 1 else 0
    if positions is None:
        positions = torch.arange(T + pad, device=inputs.device).expand(B, -1)
    elif pad:  # the padding continues the last document: after every real token, so it changes none
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, pad + 1, device=inputs.device)], 1)
    inputs, targets = F.pad(inputs, (0, pad)), F.pad(targets, (0, pad), value=ignore_index)
    index = chunk_indices(T + pad, cp, rank, inputs.device) if cp > 1 else torch.arange(T, device=inputs.device)
    kwargs = {"start_pos": positions[:, index], "mask": DocumentMask(index, positions)}
    if cp > 1:
        kwargs["cache"] = KVExchange()
    return inputs[:, index], targets[:, index], kwargs
