"""What every weight format shares: the checkpoint error, params.json keys, ModelArgs from a dict."""

import json
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Optional

from llama.common.errors import UserError
from llama.model import ModelArgs
from llama.model_args import ModelArgsError


class CheckpointError(UserError):
    """Bad checkpoint input; the message names the file, the problem and the fix."""


META_KEYS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope"]


def model_args_from_dict(params, file: Path, names: Optional[dict] = None, **overrides) -> ModelArgs:
    """ModelArgs from a params.json-style dict; unknown keys are dropped with a warning. A bad value
    is a ModelArgsError naming `file` and the key as the file spells it (`names`: ModelArgs -> file key)."""
    if not isinstance(params, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(params).__name__}, not an object of model keys "
                              f"(dim, n_layers, ...): is this the right file?")
    known = {f.name for f in fields(ModelArgs)}
    unknown = sorted(set(params) - known)
    if unknown:
        warnings.warn(f"{file}: ignoring keys ModelArgs does not know: {unknown}")
    kwargs = {k: v for k, v in params.items() if k in known}
    kwargs.update(overrides)
    try:
        return ModelArgs(**kwargs)
    except ModelArgsError as e:
        raise e.at(file, names) from None


def params_dict(args: ModelArgs) -> dict:
    """params.json content: Meta's keys, plus our extra keys only where they change the model (and
    the trained context length, when known). The one writer: conversions and training checkpoints."""
    out = {k: getattr(args, k) for k in META_KEYS}
    plain = ModelArgs(**{k: getattr(args, k) for k in META_KEYS})
    if args.hidden_dim is not None and args.hidden_dim != plain.ffn_hidden_dim:
        out["hidden_dim"] = args.hidden_dim
    if args.head_dim != plain.head_dim:
        out["head_dim"] = args.head_dim
    if args.tie_word_embeddings:
        out["tie_word_embeddings"] = True
    if args.use_scaled_rope:
        defaults = ModelArgs()
        for k in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len"):
            if getattr(args, k) != getattr(defaults, k):
                out[k] = getattr(args, k)
    if args.context_length is not None:
        out["context_length"] = args.context_length
    return out


def params_json(args: ModelArgs) -> str:
    """The text of params.json for `args`."""
    return json.dumps(params_dict(args), indent=2) + "\n"
