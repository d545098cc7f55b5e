"""llama/parallel/loss.py vocab_parallel_cross_entropy: the loss from each rank's vocabulary slice equals
F.cross_entropy on the gathered logits (values and gradients), SFT masks included."""

import pytest
import torch
import torch.nn.functional as F

from llama import parallel
from llama.parallel.loss import vocab_parallel_cross_entropy
from tests.helpers import run_distributed

IGNORE = -100


def make_case(vocab: int = 48, n: int = 40):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(n, vocab, generator=gen) * 4  # large logits: the max shift matters
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::3] = IGNORE  # masked positions (SFT: non-assistant tokens)
    weights = torch.rand(n, generator=gen)  # a non-uniform upstream gradient
    return logits, targets, weights


def reference(logits, targets, weights):
    z = logits.clone().requires_grad_()
    loss = F.cross_entropy(z, targets, ignore_index=IGNORE, reduction="none")
    (loss * weights).sum().backward()
    return loss.detach(), z.grad


def slice_worker(mp: int):
    parallel.init_distributed(mp)
    logits, targets, weights = make_case()
    rank, per = parallel.model_parallel_rank(), logits.shape[1] // mp
    z = logits[:, rank * per:(rank + 1) * per].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(z, targets, IGNORE)
    (loss * weights).sum().backward()
    return loss.detach(), z.grad


@pytest.mark.slow
@pytest.mark.parametrize("mp", [2, 4])
def test_vocab_parallel_loss_equals_gathered(mp):
    logits, targets, weights = make_case()
    want_loss, want_grad = reference(logits, targets, weights)
    per = logits.shape[1] // mp
    for rank, (loss, grad) in enumerate(run_distributed(slice_worker, mp, mp)):
        torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, want_grad[:, rank * per:(rank + 1) * per], atol=1e-6, rtol=0)
    assert (want_loss[targets == IGNORE] == 0).all() and (want_loss[targets != IGNORE] > 0).all()


def test_one_process_is_plain_cross_entropy():
    logits, targets, weights = make_case()
    torch.testing.assert_close(vocab_parallel_cross_entropy(logits, targets, IGNORE),
                               F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none"))
