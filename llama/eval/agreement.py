"""How closely one model follows another, teacher-forced: both read the same tokens, and at each
scored position the next-token distribution q of the model under test is compared with the
reference's p: top-1 agreement (argmax q == argmax p) and mean KL(p || q) in nats. Quantization
is measured this way (bench/quant_accuracy.py, tests/test_quantize.py), never on free-running
text, where one flipped argmax sends the two texts apart.

For a chat model the tokens are chat-formatted: each prompt is a user message in the model's chat
format, followed by the reference model's own greedy reply, and only the reply's positions are
scored (`chat_sequences`)."""

from typing import Iterable, List, Tuple

import torch

Sequence = Tuple[List[int], int]  # (tokens, index of the first scored token)


def chat_sequences(llama, prompts: Iterable[str], gen_len: int) -> List[Sequence]:
    """Each prompt as a user message in llama's chat format, then llama's greedy reply (gen_len
    tokens at most): (prompt + reply tokens, len(prompt)). Generated once, by the reference."""
    dialogs = [llama.encode_dialog([{"role": "user", "content": p}]) for p in prompts]
    out = []
    for tokens in dialogs:  # one at a time: the reference's max_batch_size may be 1
        reply, _ = llama.generate([tokens], gen_len, temperature=0.0)
        out.append((tokens + reply[0], len(tokens)))
    return out


@torch.inference_mode()
def scored_logprobs(model, sequences: List[Sequence]) -> torch.Tensor:
    """Log-probabilities (N, vocab) at every scored position of every sequence, in order: position
    t - 1's distribution predicts token t, for t from the sequence's first scored index on."""
    rows = []
    for tokens, first in sequences:
        logits = model(torch.tensor([tokens]))[0, first - 1 : -1]  # (T - first, vocab)
        rows.append(logits.float().log_softmax(-1))
    return torch.cat(rows)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> Tuple[float, float]:
    """(top-1 agreement, mean KL(reference || other) in nats) of two (N, vocab) log-probability tensors."""
    top1 = (reference.argmax(-1) == other.argmax(-1)).double().mean()
    kl = (reference.exp() * (reference - other)).sum(-1).double().mean()
    return float(top1), float(kl)
