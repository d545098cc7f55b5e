"""The KV cache: keys and values of the positions seen so far, one object per layer.

The caller creates it (sized to the request, `Transformer.make_cache`) and passes it to the model's
forward, so the same forward trains (no cache) and decodes (with one). A plain object, not a
module, so torch.compile takes k and v as inputs checked by shape: one compiled decode step serves
every request's cache (docs/generation.md).
"""

import torch


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
