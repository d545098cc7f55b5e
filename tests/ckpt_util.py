"""Helpers for the checkpoint tests: tiny random models and a GGUF writer (through the `gguf` package,
independent of llama/checkpoint/gguf.py's reader)."""

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as Q

from llama.model import ModelArgs, Transformer

# n_kv_heads=2 < 4 ranks: model parallel 4 duplicates K/V heads. vocab and FFN divisible by 4.
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96, rope_theta=10000.0,
            max_seq_len=64)


def tiny_model(seed: int = 1, **overrides):
    args = ModelArgs(**{**TINY, **overrides})
    model = Transformer(args)
    model.init_weights(seed)
    # norms at 1.0 would hide a norm loaded into the wrong place: make them distinct
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval(), args


def tokens(batch: int = 2, length: int = 20, vocab: int = 128, seed: int = 0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


_GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
               "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
               "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(meta: str) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if meta in top:
        return top[meta]
    _, i, rest = meta.split(".", 2)
    return f"blk.{i}.{_GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def write_gguf(path, state_dict, args: ModelArgs, qtype=Q.F32, arch: str = "llama"):
    """A llama.cpp-style GGUF of a Meta-key state dict; matrices stored as `qtype`, norms as F32."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    w.add_token_list([f"tok{i}" for i in range(args.vocab_size)])
    w.add_token_types(np.ones(args.vocab_size, dtype=np.int32).tolist())
    for name, t in state_dict.items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        arr = t.detach().float().numpy()
        if arr.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
