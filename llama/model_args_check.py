"""The one check of a model shape (ModelArgs), wherever it comes from.

params.json, an HF config.json, GGUF metadata, a TOML `[model]` table, `model.key=value` on the
command line and a `model_config` file all end in `ModelArgs(...)`, whose `__post_init__` calls
`check_model_args`. A bad value raises `ModelArgsError` naming the key, the value and the fix; the
entry point that read the file adds where it came from with `.at(source, names)`, so the user sees

    error: ckpt/params.json: "n_kv_heads" = 0: must be a positive integer (n_heads=4 must be a multiple of it)

A leaf module (it imports nothing from llama but the error base class), so model.py stays math.
"""

import dataclasses
import typing

from llama.errors import UserError


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
