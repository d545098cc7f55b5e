"""Llama 3.1 (The Llama 3 Herd of Models, arXiv 2407.21783): a decoder-only Transformer, bottom-up.

    tokens -> embedding -> n_layers x [x + Attention(RMSNorm(x)); x + FeedForward(RMSNorm(x))]
           -> RMSNorm -> output -> logits

Shapes: B batch, T tokens in this call, S cached positions, D width, H query heads, K key/value
heads, Dh head width. Names are Meta's checkpoint keys. Under model parallelism a rank holds a
share of the heads and FFN units (parallel.py) and sees only it. Why each choice: docs/model.md.
"""

import math
import zlib
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama import parallel
from llama.model_args import ModelArgs, ModelArgsError  # the shape: Meta's params.json keys


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019), in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """theta^(-2i/Dh), the speed of each rotating pair (Su et al., 2021, eq. 15)."""
    dh = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.float32, device=device) / dh))
    if not args.use_scaled_rope:
        return freqs  # (Dh/2,)
    # Llama 3.1: keep short wavelengths, divide long ones by the factor, blend in between.
    wavelen = 2 * math.pi / freqs
    orig, factor = args.rope_original_max_seq_len, args.rope_scaling_factor
    low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
    smooth = (orig / wavelen - low) / (high - low)  # 0 at the band's long edge, 1 at its short one
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > orig / low, freqs / factor, freqs)
    return torch.where((wavelen >= orig / high) & (wavelen <= orig / low), blended, scaled)


def precompute_freqs_cis(args: ModelArgs, device=None) -> torch.Tensor:
    """cos, sin of position * freq: (max_seq_len, Dh/2, 2), fp32."""
    positions = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, rope_frequencies(args, device))  # (S, Dh/2)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]), Meta's layout: (a + ib)(cos + i sin) in fp32.
    freqs_cis: (T, Dh/2, 2), or (B, T, Dh/2, 2) for a position per sequence."""
    B, T, H, Dh = x.shape
    a, b = x.float().reshape(B, T, H, Dh // 2, 2).unbind(-1)  # (B, T, H, Dh/2)
    cos, sin = freqs_cis.unsqueeze(-3).unbind(-1)  # (.., T, 1, Dh/2)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)


# Owned by the caller (Transformer.make_cache, sized to the request) and passed in: the same forward
# trains and decodes. Not a module: compile takes k, v as inputs checked by shape (docs/generation.md).
class KVCache:
    """Keys and values of one layer, (B, K, S, Dh): batch, K/V heads, slots, head width."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype=None, device=None):
        shape = (batch_size, n_kv_heads, max_len, head_dim)  # (B, K, S, Dh): what SDPA wants
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start_pos, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, K, T, Dh) at [start_pos, start_pos+T); return all keys/values so far. A
        tensor start_pos (B,) puts each sequence at its own position and returns every slot (a fixed
        shape; the caller masks the rest)."""
        if isinstance(start_pos, torch.Tensor):
            pos = start_pos.view(-1, 1) + torch.arange(k.shape[2], device=k.device)  # (B, T)
            rows = torch.arange(k.shape[0], device=k.device).view(-1, 1)  # (B, 1)
            self.k[rows, :, pos] = k.transpose(1, 2)  # the indexed slots are (B, T, K, Dh)
            self.v[rows, :, pos] = v.transpose(1, 2)
            return self.k, self.v
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; position {end - 1} does not fit")
        self.k[: k.shape[0], :, start_pos:end] = k
        self.v[: v.shape[0], :, start_pos:end] = v
        return self.k[: k.shape[0], :, :end], self.v[: v.shape[0], :, :end]


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al., 2023): H query heads share K K/V heads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        # more ranks than K/V heads: each rank keeps a copy of its queries' K/V head
        self.n_kv_heads = parallel.check_model_parallel(args, parallel.model_parallel_size())
        self.head_dim = args.head_dim
        self.wq = parallel.column_parallel_linear(args.dim, args.n_heads * self.head_dim)
        self.wk = parallel.column_parallel_linear(args.dim, self.n_kv_heads * self.head_dim)
        self.wv = parallel.column_parallel_linear(args.dim, self.n_kv_heads * self.head_dim)
        self.wo = parallel.row_parallel_linear(args.n_heads * self.head_dim, args.dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos, cache: Optional[KVCache], mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H_local, Dh)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, K_local, Dh)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, Dh)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # (B, K_local, S, Dh)
        is_causal = T > 1 and mask is None  # a mask passed in: a position per sequence
        if is_causal and k.shape[2] != T:  # after a cache: all S - T earlier slots + a triangle
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            is_causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = parallel.column_parallel_linear(dim, hidden_dim)
        self.w2 = parallel.row_parallel_linear(hidden_dim, dim)
        self.w3 = parallel.column_parallel_linear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cis, start_pos=0, cache: Optional[KVCache] = None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size <= 0:
            raise ModelArgsError("vocab_size", params.vocab_size, "is not set: take it from the tokenizer (tokenizer.n_words)")
        self.params = params
        self.tok_embeddings = parallel.vocab_parallel_embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = parallel.column_parallel_linear(params.dim, params.vocab_size)  # this rank's vocabulary
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # not in checkpoints; real even on the meta device (loads with assign=True)
        meta = torch.get_default_device().type == "meta"
        self.register_buffer("freqs_cis", precompute_freqs_cis(params, "cpu" if meta else None), persistent=False)

    def forward(self, tokens: torch.Tensor, start_pos=0, cache: Optional[List[KVCache]] = None,
                last_only: bool = False, head: Optional[Callable] = None, mask=None):
        """tokens (B, T) -> float logits (B, T, vocab), or (B, 1, vocab) if last_only; head(self, h): its result on the
        final residual stream h (B, T, D) instead (a loss), inside the call as FSDP needs (docs/fsdp.md). start_pos: an
        int, a start per sequence (B,) sharing a cache, or positions (B, T) with their `mask` (llama/parallel/context.py)."""
        B, T = tokens.shape
        if isinstance(start_pos, torch.Tensor):  # (B, T) positions, or (B,): a ragged batch sharing a cache
            positions = start_pos if start_pos.dim() == 2 else start_pos.view(-1, 1) + torch.arange(T, device=tokens.device)
            freqs_cis = self.freqs_cis[positions]  # (B, T, Dh/2, 2)
            if mask is None:  # a ragged batch: every cache slot up to each sequence's position
                mask = (torch.arange(cache[0].k.shape[2], device=tokens.device) <= positions.unsqueeze(-1)).unsqueeze(1)
        elif start_pos + T > self.params.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len={self.params.max_seq_len}")
        else:
            freqs_cis = self.freqs_cis[start_pos : start_pos + T]  # (T, Dh/2, 2)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs_cis, start_pos, None if cache is None else cache[i], mask)
        h = h[:, -1:] if last_only else h  # (B, 1, D): decoding needs the last position only
        return head(self, h) if head is not None else parallel.gather_last_dim(self.logits(h))  # (B, T, V)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head: final norm + output, (B, T, D) -> float logits of this rank's vocabulary (B, T, V/M)."""
        return self.output(self.norm(h)).float()

    def make_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> List[KVCache]:
        attn, w = self.layers[0].attention, self.tok_embeddings.weight
        k_local = attn.n_kv_heads // parallel.model_parallel_size()
        kw = dict(dtype=dtype or w.dtype, device=device or w.device)
        return [KVCache(batch_size, max_len, k_local, attn.head_dim, **kw) for _ in self.layers]

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """N(0, 0.02), wo and w2 / sqrt(2 n_layers) (GPT-2), norms 1; the same for any model-parallel
        layout: each full tensor is drawn from a seed of its name, then sharded."""
        kv = self.params.n_kv_heads
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            std = 0.02 / (math.sqrt(2 * self.params.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            full = torch.empty(parallel.full_shape(name, p.shape, n_kv_heads=kv)).normal_(0.0, std, generator=gen)
            p.copy_(parallel.shard(name, full, n_kv_heads=kv))
