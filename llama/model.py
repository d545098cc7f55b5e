"""Llama 3.1: a decoder-only Transformer, read top to bottom like the paper.

    tokens -> embedding -> n_layers x [ x + Attention(RMSNorm(x)) ; x + FeedForward(RMSNorm(x)) ]
           -> RMSNorm -> output projection -> logits

Shapes: B batch, T tokens in this call, S cached positions, D width, H query heads, K key/value
heads, Dh head width. Names (wq, w1, tok_embeddings) are Meta's checkpoint keys. Under model
parallelism each rank holds a share of the heads and FFN units (llama/parallel.py) and the code
below sees only that share, via `view(B, T, -1, head_dim)`.
"""

import math
import zlib
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama import parallel
from llama.model_args_check import ModelArgsError, check_model_args


@dataclass
class ModelArgs:
    # Meta's params.json keys.
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (plain multi-head attention)
    vocab_size: int = -1  # -1 in Llama 2's params.json: the tokenizer decides
    multiple_of: int = 256  # the SwiGLU width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1+: stretch long RoPE wavelengths for 128K context
    max_batch_size: int = 32
    max_seq_len: int = 2048
    # Beyond Meta's keys (HF/GGUF shapes): FFN and head widths, tied embeddings, 3.1 RoPE scaling.
    hidden_dim: Optional[int] = None
    head_dim: Optional[int] = None
    tie_word_embeddings: bool = False
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    context_length: Optional[int] = None  # the trained context, kept through conversions; unused here

    def __post_init__(self):
        check_model_args(self)  # types, positive sizes, head divisibility: a ModelArgsError naming the key
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices, not two), scaled, rounded up."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019). No mean subtraction, no bias.
    Computed in fp32 even for bf16 activations: the mean of squares overflows/underflows in 16 bits."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """The rotation speed of each pair of dimensions: theta^(-2i/Dh) (Su et al., 2021, eq. 15).
    Llama 3.1 (use_scaled_rope) stretches the context 8x: wavelengths shorter than original/high
    are kept, longer than original/low are divided by the factor, a linear ramp blends between."""
    dh = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.float32, device=device) / dh))  # (Dh/2,)
    if not args.use_scaled_rope:
        return freqs
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = args.rope_original_max_seq_len / args.rope_low_freq_factor
    high_freq_wavelen = args.rope_original_max_seq_len / args.rope_high_freq_factor
    # smooth: 0 at the long-wavelength edge of the band, 1 at the short one
    smooth = (args.rope_original_max_seq_len / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor
    )
    blended = (1 - smooth) * freqs / args.rope_scaling_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / args.rope_scaling_factor, freqs)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def precompute_freqs_cis(args: ModelArgs, device=None) -> torch.Tensor:
    """cis(angle) = cos + i sin of position * freq, stored as (cos, sin) pairs: (max_seq_len, Dh/2, 2)."""
    positions = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, rope_frequencies(args, device))  # (S, Dh/2), fp32: exact at 128K
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) by its angle (Meta's interleaved layout): the complex
    product (a + ib)(cos + i sin) written in reals, in fp32. freqs_cis is (T, Dh/2, 2), or
    (B, T, Dh/2, 2) when each sequence is at its own position."""
    B, T, H, Dh = x.shape
    a, b = x.float().reshape(B, T, H, Dh // 2, 2).unbind(-1)  # (B, T, H, Dh/2) each
    cos, sin = freqs_cis.unsqueeze(-3).unbind(-1)  # (.., T, 1, Dh/2): broadcast over the heads
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)  # (B, T, H, Dh)


class KVCache:
    """Keys and values of the positions seen so far, for one layer, created by the caller (sized to
    the request) and passed in. A plain object, not a module, so torch.compile takes k and v as inputs
    checked by shape: one compiled decode step serves every request's cache."""

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
    """Grouped-query attention (Ainslie et al., 2023): H query heads share K key/value heads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        # More ranks than K/V heads: each rank keeps a copy of the K/V head its queries use.
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
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, K_local, Dh)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, Dh)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # (B, K_local, S, Dh), S = start_pos + T
        # Causal: is_causal needs no T x T mask tensor; a chunk continuing a cache attends to all
        # S - T earlier positions plus its own causal triangle.
        is_causal = T > 1 and mask is None  # a mask passed in: per-sequence positions (Transformer)
        if is_causal and k.shape[2] != T:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            is_causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): w2(silu(w1 x) * w3 x). w1 is the gate, w3 the value."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = parallel.column_parallel_linear(dim, hidden_dim)
        self.w2 = parallel.row_parallel_linear(hidden_dim, dim)
        self.w3 = parallel.column_parallel_linear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: normalise, transform, add back."""

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
        self.output = parallel.column_parallel_linear(params.dim, params.vocab_size, gather_output=True)
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight  # same (vocab, dim) shard on every rank
        # Derived, not learned: not in checkpoints. Computed for real even when the model is built on the
        # `meta` device (before its weights are loaded with assign=True), which has no other way to fill it.
        meta = torch.get_default_device().type == "meta"
        self.register_buffer("freqs_cis", precompute_freqs_cis(params, "cpu" if meta else None), persistent=False)

    def forward(self, tokens: torch.Tensor, start_pos=0, cache: Optional[List[KVCache]] = None,
                last_only: bool = False, hidden: bool = False) -> torch.Tensor:
        """tokens (B, T) at positions [start_pos, start_pos+T) -> float logits (B, T, vocab), or (B, 1,
        vocab) with last_only. A tensor start_pos (B,) (with a cache) decodes a ragged batch: each
        sequence attends to its own slots [0, start_pos[b] + t] only."""
        B, T = tokens.shape
        mask = None
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos.view(-1, 1) + torch.arange(T, device=tokens.device)  # (B, T)
            freqs_cis = self.freqs_cis[positions]  # (B, T, Dh/2, 2)
            slots = torch.arange(cache[0].k.shape[2], device=tokens.device)  # (S,)
            mask = (slots <= positions.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, S)
        elif start_pos + T > self.params.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len={self.params.max_seq_len}")
        else:
            freqs_cis = self.freqs_cis[start_pos : start_pos + T]  # (T, Dh/2, 2)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs_cis, start_pos, None if cache is None else cache[i], mask)
        if last_only:
            h = h[:, -1:]
        if hidden:  # (B, T, D) before the final norm: the caller applies norm + output (training's chunked loss)
            return h
        return self.output(self.norm(h)).float()

    def make_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> List[KVCache]:
        """One KVCache per layer for `batch_size` sequences of up to `max_len` positions."""
        attn = self.layers[0].attention
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = device or self.tok_embeddings.weight.device
        k_local = attn.n_kv_heads // parallel.model_parallel_size()
        return [KVCache(batch_size, max_len, k_local, attn.head_dim, dtype, device) for _ in self.layers]

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """N(0, 0.02), residual outputs (wo, w2) scaled by 1/sqrt(2 n_layers) (GPT-2), norms at 1. Each
        logical tensor is drawn whole from a generator seeded by its name (each K/V head once), then
        this rank keeps its shard: every model-parallel layout gets the same weights."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            std = 0.02
            if name.endswith(("wo.weight", "w2.weight")):
                std /= math.sqrt(2 * self.params.n_layers)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            kv = self.params.n_kv_heads
            full = torch.empty(parallel.full_shape(name, p.shape, n_kv_heads=kv)).normal_(0.0, std, generator=gen)
            p.copy_(parallel.shard(name, full, n_kv_heads=kv))
