"""Evaluation (llama/eval/) against independent references: HF transformers' strided-window loop and
log-softmax on the same SmolLM2 GGUF, lm-evaluation-harness driving our adapter, one process vs
model parallel, and the CLI's one-line errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.checkpoint import load_model
from llama.eval import EvalError
from llama.eval.perplexity import perplexity, prefix_token, strided_windows
from llama.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt wind. "
        "Every night for forty years the keeper had climbed its narrow stairs to light the lamp, and every "
        "morning he had written a single line in the logbook: the weather, the ships he had seen, and "
        "whether the sea had been kind. When he retired, the town found the books stacked in his kitchen.")


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_model(smollm2_gguf, max_seq_len=128, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def hf_strided_nll(hf_model, ids, max_length, stride):
    """HF's perplexity guide, verbatim in spirit: labels -100 before the window's new targets; the
    loss is a mean over the shifted labels that are not -100, so multiply back by their count."""
    ids = torch.tensor([ids])
    n, nll, count, prev_end = ids.shape[1], 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        valid = int((target_ids[:, 1:] != -100).sum())
        if valid:
            with torch.no_grad():
                loss = hf_model(input_ids, labels=target_ids).loss
            nll, count = nll + float(loss) * valid, count + valid
        prev_end = end
        if end == n:
            break
    return nll, count


def test_strided_windows_score_each_token_once():
    for n, L, s in [(100, 32, 8), (100, 32, 32), (33, 32, 31), (5, 32, 4), (64, 32, 1)]:
        windows = strided_windows(n, L, s)
        scored = [t for b, e, k in windows for t in range(e - k, e)]
        assert scored == sorted(set(scored))  # each once, in order
        assert all(e - b <= L and e - k >= b + 1 for b, e, k in windows)  # a target has context
        if s < L:
            assert scored == list(range(1, n))


@pytest.mark.parametrize("max_length,stride", [(48, 16), (48, 48), (128, 128)])
def test_perplexity_matches_hf_strided_loop(smol, smol_tok, hf_smollm2, max_length, stride):
    res = perplexity(smol, smol_tok, TEXT, max_length, stride, batch_size=3)
    ids = [prefix_token(smol_tok)] + smol_tok.encode(TEXT, bos=False, eos=False)
    nll, count = hf_strided_nll(hf_smollm2, ids, max_length, stride)
    assert res.tokens == count and count > 60
    assert res.nll == pytest.approx(nll, rel=1e-4)
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-4)
    assert 1 < res.perplexity < 100  # a real model on real prose
