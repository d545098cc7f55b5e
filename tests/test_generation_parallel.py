"""Generation under model parallelism (gloo processes on the CPU) against a single process: greedy
text, sampling in step on every rank, and the compiled decode step against the eager one."""

import pytest
import torch

from llama.checkpoint import save_meta
from llama.generation import Llama, cache_slot, mark_cache_dynamic
from tests.helpers import run_distributed


# ---------------------------------------------------------------------------- model parallel


def _generate_on_rank(ckpt_dir, prompts):
    llama = Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=len(prompts), model_parallel_size=2)
    return llama.generate(prompts, 16, temperature=0)[0], llama.generate(prompts, 8, temperature=0.8)[0]


@pytest.mark.slow
def test_model_parallel_greedy_equals_single_process(tiny_dir):
    prompts = [[128000, 791, 6864, 315], [128000, 40, 1093]]
    single = Llama.build(tiny_dir, max_seq_len=64, max_batch_size=2)
    expected = single.generate(prompts, 16, temperature=0)[0]
    ranks = run_distributed(_generate_on_rank, 2, tiny_dir, prompts)
    assert ranks[0][0] == expected and ranks[1][0] == expected
    assert ranks[0][1] == ranks[1][1]  # sampling: every rank continues with the same tokens


def _compiled_and_eager_steps(ckpt_dir, mp, forced):
    """On each rank: prefill two ragged prompts, then teacher-force `forced` one step at a time
    through the compiled step and the eager step from the same cache; both steps' logits per step."""
    from llama.checkpoint import load_model
    from llama.parallel import init_distributed

    init_distributed(mp)
    model = load_model(ckpt_dir, max_seq_len=64, max_batch_size=2)  # shards are views into the mapped file
    llama = Llama(model, tokenizer=None, compile=True)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    got, want = [], []
    with torch.inference_mode():
        cache = model.make_cache(2, 16)
        mark_cache_dynamic(cache)
        for b, p in enumerate(prompts):
            llama._prefill(p, cache_slot(cache, b), None)
        positions = torch.tensor([len(p) for p in prompts])
        for step in forced:
            tokens = torch.tensor([[t] for t in step])  # (2, 1)
            got.append(llama._decode(tokens, positions, cache))
            want.append(llama._decode_step(tokens, positions, cache))  # rewrites the same slots, same k, v
            positions = positions + 1
    return torch.stack(got), torch.stack(want)  # (steps, 2, vocab) each


@pytest.mark.slow
@pytest.mark.parametrize("mp", [2, 4])
def test_compiled_model_parallel_step_matches_eager(tmp_path, template_gemm, mp):
    """Compiled decoding under model parallelism (frozen, pre-blocked weights; gathered logits):
    each rank's compiled step equals the eager step, teacher-forced, and a single eager process.
    The C++ GEMM template is forced (untimed): pre-blocking a frozen weight is what read rank 0's rows."""
    from tests.helpers import tiny_model

    model, args = tiny_model(vocab_size=256)  # n_kv_heads=2: at mp=4 each K/V head is duplicated
    save_meta(model.state_dict(), args, tmp_path)
    forced = [[9, 10], [11, 12], [13, 14]]
    ranks = run_distributed(_compiled_and_eager_steps, mp, tmp_path, mp, forced)
    single = Llama(model, tokenizer=None)
    with torch.inference_mode():
        cache = model.make_cache(2, 16)
        for b, p in enumerate([[1, 2, 3, 4, 5], [6, 7]]):
            single._prefill(p, cache_slot(cache, b), None)
        positions, reference = torch.tensor([5, 2]), []
        for step in forced:
            reference.append(single._decode_step(torch.tensor([[t] for t in step]), positions, cache))
            positions = positions + 1
    reference = torch.stack(reference)
    scale = reference.abs().max()
    for got, want in ranks:
        assert (want - reference).abs().max() <= 1e-5 * scale  # eager model parallel: the control
        half = got.shape[-1] // 2  # the fault seen: the upper half of the vocabulary was rank 0's shard
        assert (got - want).abs().max() <= 1e-4 * scale, \
            [(got - want)[..., :half].abs().max().item(), (got - want)[..., half:].abs().max().item()]
