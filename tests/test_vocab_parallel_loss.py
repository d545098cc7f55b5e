"""llama/parallel/loss.py: the loss from each rank's vocabulary slice equals F.cross_entropy on the
gathered logits (values and gradients), SFT masks included; the argmax from the slices equals argmax
on the gathered logits, ties across ranks included."""

import pytest
import torch
import torch.nn.functional as F

from llama import parallel
from llama.parallel.loss import vocab_parallel_argmax, vocab_parallel_cross_entropy
from tests.helpers import run_distributed

IGNORE = -100


def make_case(vocab: int = 48, n: int = 40):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(n, vocab, generator=gen) * 4  # large logits: the max shift matters
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::3] = IGNORE  # masked positions (SFT: non-assistant tokens)
    weights = torch.rand(n, generator=gen)  # a non-uniform upstream gradient
    return logits, targets, weights


def tied_logits(vocab: int = 48):
    """Rows whose largest logit appears twice: in two ranks' slices, twice in one slice, once."""
    z = torch.randn(4, vocab, generator=torch.Generator().manual_seed(5))
    top = z.max() + 1
    z[0, [7, vocab - 3]] = top  # ranks 0 and the last at any model-parallel size > 1
    z[1, [vocab - 5, vocab - 2]] = top  # both in the last rank's slice
    z[2, vocab // 2 + 1] = top
    return z


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
    tied = tied_logits()
    return loss.detach(), z.grad, vocab_parallel_argmax(tied[:, rank * per:(rank + 1) * per])


@pytest.mark.slow
@pytest.mark.parametrize("mp", [2, 4])
def test_vocab_parallel_loss_equals_gathered(mp):
    logits, targets, weights = make_case()
    want_loss, want_grad = reference(logits, targets, weights)
    per = logits.shape[1] // mp
    want_argmax = tied_logits().argmax(-1)
    assert want_argmax.tolist()[:2] == [7, 43]  # the first among equals
    for rank, (loss, grad, argmax) in enumerate(run_distributed(slice_worker, mp, mp)):
        assert argmax.tolist() == want_argmax.tolist()
        torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, want_grad[:, rank * per:(rank + 1) * per], atol=1e-6, rtol=0)
    assert (want_loss[targets == IGNORE] == 0).all() and (want_loss[targets != IGNORE] > 0).all()


def test_one_process_is_plain_cross_entropy():
    logits, targets, weights = make_case()
    torch.testing.assert_close(vocab_parallel_cross_entropy(logits, targets, IGNORE),
                               F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none"))
    assert vocab_parallel_argmax(tied_logits()).tolist() == tied_logits().argmax(-1).tolist()
