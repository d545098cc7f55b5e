"""The one table of dtype names every entry point accepts: both spellings of each.

    --dtype bf16 / bfloat16, fp16 / float16, fp32 / float32     (generate.py, python -m llama.convert)
    dtype=bf16 ... in train.py configs; Llama.build(dtype="bf16") or dtype=torch.bfloat16
"""

from typing import Optional, Union

import torch

from llama.common.errors import UserError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
CHOICES = "bf16 (bfloat16), fp16 (float16) or fp32 (float32)"


class DTypeError(UserError):
    """A dtype name not in the table."""


def parse_dtype(value: Union[None, str, torch.dtype], what: str = "dtype") -> Optional[torch.dtype]:
    """None (keep the default), a torch.dtype, or one of the names above -> torch.dtype or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in DTYPES:
        return DTYPES[value.lower()]
    raise DTypeError(f"{what}={value!r} is not a dtype: use {CHOICES}")


def dtype_name(value: Union[str, torch.dtype], what: str = "dtype") -> str:
    """The canonical torch name ('bfloat16') of a dtype or either spelling of its name."""
    return str(parse_dtype(value, what)).removeprefix("torch.")


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    """A training dtype setting (train.py's dtype, LoRA's base_dtype): "auto" is bfloat16 on CUDA and
    float32 elsewhere (a CPU computes bf16 no faster); otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(name)
