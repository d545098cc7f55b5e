"""ModelArgs: the shape of a Llama model, as Meta's params.json spells it (plus the HF/GGUF extras).

`ModelArgs(**json.load(open("params.json")), max_seq_len=..., max_batch_size=...)` works for every
official params.json; every value is checked on construction (model_args_check.py).
"""

from dataclasses import dataclass
from typing import Optional

from llama.model_args_check import check_model_args


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
    context_length: Optional[int] = None  # the trained context, kept through conversions; unused by the model

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
