"""ModelArgs: the shape of a Llama model, as Meta's params.json spells it (plus the HF/GGUF extras).

`ModelArgs(**json.load(open("params.json")), max_seq_len=..., max_batch_size=...)` works for every
official params.json. Every value is checked on construction, wherever it comes from (params.json, an HF
config.json, GGUF metadata, a TOML `[model]` table, `model.key=value` on the command line): a bad value
raises `ModelArgsError` naming the key, the value and the fix; the entry point that read the file adds
where it came from with `.at(source, names)`, so the user sees

    error: ckpt/params.json: "n_kv_heads" = 0: must be a positive integer (n_heads=4 must be a multiple of it)
"""

import dataclasses
import typing
from dataclasses import dataclass
from typing import Optional

from llama.common.errors import UserError


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


# ---------------------------------------------------------------------------- checks


class ModelArgsError(UserError):
    """A bad model shape. `key`, `value` and `problem` let an entry point re-word it for its file."""

    def __init__(self, key: str, value, problem: str, source: str = ""):
        self.key, self.value, self.problem, self.source = key, value, problem, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key!r} = {value!r}: {problem}")

    def at(self, source, names: typing.Optional[dict] = None) -> "ModelArgsError":
        """The same error, naming the file (or 'the command line') and the key as that source spells it
        (an HF config.json says hidden_size where ModelArgs says dim)."""
        key = (names or {}).get(self.key, self.key)
        return ModelArgsError(key, self.value, self.problem, str(source))


# Sizes that must be positive integers, and positive numbers; the rest have their own rules below.
_POSITIVE_INTS = ["dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len",
                  "hidden_dim", "head_dim", "rope_original_max_seq_len"]
_POSITIVE_NUMBERS = ["ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"]

_HINTS = {
    "n_kv_heads": ": a divisor of n_heads (leave it out for one K/V head per query head)",
    "n_layers": ": at least 1 block",
    "max_seq_len": ": the longest sequence the model will see, e.g. 2048",
    "max_batch_size": ": the most sequences per forward pass, e.g. 1",
    "head_dim": ": leave it out for dim // n_heads",
    "hidden_dim": ": leave it out for Meta's rule from dim, multiple_of and ffn_dim_multiplier",
}


def _kind(annotation) -> typing.Tuple[str, bool]:
    """('int' | 'float' | 'bool' | ..., optional) of a dataclass field's annotation."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    return getattr(annotation, "__name__", str(annotation)), optional


def _check_type(key: str, value, annotation) -> None:
    kind, optional = _kind(annotation)
    if value is None:
        if not optional:
            raise ModelArgsError(key, value, f"must be set (a {kind})")
        return
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        fix = "write a whole number without quotes, e.g. 128"
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        fix = "write a number without quotes, e.g. 1e-5"
    elif kind == "bool":
        ok = isinstance(value, bool)
        fix = "write true or false"
    else:
        return
    if not ok:
        raise ModelArgsError(key, value, f"must be {'an integer' if kind == 'int' else 'a ' + kind}: {fix}")


def check_model_args(args) -> None:
    """Types, positive sizes and the head divisibility rules of a ModelArgs (before defaults are
    derived: n_kv_heads and head_dim may still be None). Raises ModelArgsError."""
    for f in dataclasses.fields(args):
        _check_type(f.name, getattr(args, f.name), f.type)
    for key in _POSITIVE_INTS + _POSITIVE_NUMBERS:
        value = getattr(args, key)
        if value is not None and not value > 0:  # `not >` also refuses NaN
            raise ModelArgsError(key, value, "must be positive" + _HINTS.get(key, ""))
    if args.vocab_size <= 0 and args.vocab_size != -1:
        raise ModelArgsError("vocab_size", args.vocab_size,
                             "must be positive (or -1: take it from the tokenizer, as Llama 2's params.json does)")
    n_kv = args.n_kv_heads or args.n_heads
    if args.n_heads % n_kv != 0:
        raise ModelArgsError("n_kv_heads", args.n_kv_heads,
                             f"n_heads={args.n_heads} must be a multiple of it (each K/V head serves a whole group "
                             f"of query heads): pick a divisor of n_heads")
    if args.head_dim is None and args.dim % args.n_heads != 0:
        raise ModelArgsError("n_heads", args.n_heads,
                             f"does not divide dim={args.dim}: pick a divisor, or set head_dim explicitly")
    head_dim = args.head_dim or args.dim // args.n_heads
    if head_dim % 2 != 0:
        raise ModelArgsError("head_dim", head_dim, "must be even: RoPE rotates pairs of dimensions")
    if args.use_scaled_rope and not args.rope_low_freq_factor < args.rope_high_freq_factor:
        raise ModelArgsError("rope_low_freq_factor", args.rope_low_freq_factor,
                             f"must be below rope_high_freq_factor={args.rope_high_freq_factor} (Llama 3.1: 1 and 4)")
