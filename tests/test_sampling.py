"""llama/generation/sampling.py, and sampling through Llama.generate: seeded runs repeat, temperature 0 is the
argmax, top-p and top-k keep exactly the promised support with the promised frequencies."""

import pytest
import torch

from llama.generation import Llama
from llama.generation.sampling import restrict, sample


def test_seeded_sampling_is_reproducible(tiny_dir):
    prompts = [[128000, 791, 6864], [128000, 40]]
    runs = []
    for seed in (7, 7, 8):
        llama = Llama.build(tiny_dir, max_seq_len=64, max_batch_size=2, seed=seed)
        with torch.no_grad():
            llama.model.output.weight.div_(30.0)  # flatten the distribution so samples vary
        runs.append(llama.generate(prompts, 24, temperature=1.0, top_p=0.95, top_k=1000)[0])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_greedy_is_argmax_at_temperature_zero():
    logits = torch.randn(16, 50)
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))


@pytest.mark.parametrize("top_p, top_k, allowed", [(1.0, 3, [0, 1, 2]), (0.6, 0, [0, 1]), (0.5, 2, [0])])
def test_top_p_and_top_k_restrict_the_support(top_p, top_k, allowed):
    probs = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
    n = 40000
    draws = sample(probs.log().expand(n, -1), 1.0, top_p, top_k, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).float()
    assert set(torch.nonzero(counts)[:, 0].tolist()) == set(allowed)
    expected = torch.zeros(6)
    expected[allowed] = probs[allowed] / probs[allowed].sum()
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 5 * sigma + 1e-9).all(), (counts / n, expected)
    kept, ids = restrict(probs[None], top_p, top_k)
    assert sorted(ids[0][kept[0] > 0].tolist()) == allowed
