"""Choosing the next token from the model's logits.

- temperature 0: greedy (argmax), deterministic;
- temperature T > 0: sample from softmax(logits / T); lower T sharpens the distribution;
- top-k (Fan et al., 2018): keep only the k most likely tokens;
- top-p, "nucleus" (Holtzman et al., 2019): keep the smallest set of most likely tokens whose
  probability mass reaches p (Meta's rule: a token stays if the mass *before* it is <= p).
Both restrictions renormalise what is left; top-k is applied first, then top-p, as HF does.
"""

import math
from typing import Optional, Tuple

import torch

from llama.common.errors import ArgumentError


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
    """Refuse values that have no meaning, naming the fix (raises ArgumentError, a ValueError)."""
    if not 0 <= temperature < math.inf:  # also catches NaN
        raise ArgumentError(f"temperature={temperature} is not a finite number >= 0: use 0 for greedy decoding "
                            f"or a value > 0 to sample")
    if not 0 < top_p <= 1:
        raise ArgumentError(f"top_p={top_p} is outside (0, 1]: use 1 to disable nucleus sampling, e.g. 0.9 to enable it")
    if top_k < 0:
        raise ArgumentError(f"top_k={top_k} is negative: use 0 to disable top-k sampling, e.g. 50 to enable it")


def restrict(probs: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """probs (B, V) -> (kept (B, N), ids (B, N)): the allowed tokens' renormalised probabilities in
    descending order, zero where top-k or top-p removed a token, and their token ids."""
    if 0 < top_k < probs.shape[-1]:
        kept, ids = probs.topk(top_k, dim=-1)  # (B, k), sorted descending
    else:
        kept, ids = probs.sort(dim=-1, descending=True)  # (B, V)
    kept = kept / kept.sum(-1, keepdim=True)
    if top_p < 1.0:
        mass_before = kept.cumsum(-1) - kept  # (B, N): probability of the more likely tokens
        kept = kept.masked_fill(mass_before > top_p, 0.0)  # the most likely token always stays
        kept = kept / kept.sum(-1, keepdim=True)
    return kept, ids


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p >= 1.0 and top_k == 0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    kept, ids = restrict(probs, top_p, top_k)
    choice = torch.multinomial(kept, 1, generator=generator)  # (B, 1) index into the kept list
    return ids.gather(-1, choice).squeeze(-1)


def alternatives(logits: torch.Tensor, temperature: float, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The n most likely tokens and their probabilities under the temperature being sampled at
    (the plain softmax for greedy decoding): ((B, n) probs, (B, n) ids). For --show-probs."""
    probs = torch.softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
    return probs.topk(min(n, probs.shape[-1]), dim=-1)
