"""llama/fast.py: the compiled decode step takes its kernels by rule and says which it took."""

import pytest
import torch

from llama.fast import mark_cache_dynamic
from llama.generation import Llama, cache_slot
from tests.helpers import tiny_model


def compiled_step_kernels(model):
    """Compile a fresh decode step (default gemm), run it once for a batch of 2, and return the
    kernels it recorded and its logits against the eager step's."""
    llama = Llama(model, tokenizer=None, compile=True)
    with torch.inference_mode(), torch._inductor.config.patch(fx_graph_cache=False):  # lower it here
        cache = model.make_cache(2, 16)
        mark_cache_dynamic(cache)
        for b, p in enumerate([[1, 2, 3], [4, 5]]):
            llama._prefill(p, cache_slot(cache, b), None)
        tokens, positions = torch.tensor([[6], [7]]), torch.tensor([3, 2])
        got = llama._decode(tokens, positions, cache)
        want = llama._decode_step(tokens, positions, cache)
    return dict(llama._decode.kernels), (got - want).abs().max().item()


@pytest.mark.slow
def test_compiled_step_takes_the_same_kernel_per_product_every_time(monkeypatch):
    """By default (gemm=template) every product of the step takes the C++ template, untimed: two
    compiles of the same shapes record the same kernels, one per product shape (concat-linear
    joins wq/wk/wv and w1/w3)."""
    monkeypatch.delenv("LLAMA_COMPILE_GEMM", raising=False)
    model, args = tiny_model(vocab_size=256)  # dim 64, 4 heads of 16, 2 KV heads, FFN 96
    first, err = compiled_step_kernels(model)
    assert err < 1e-4
    kv = 2 * args.n_kv_heads * args.dim // args.n_heads
    shapes = {f"2x64->{64 + kv}", "2x64->64", f"2x64->{2 * 96}", "2x96->64", "2x64->256"}
    assert {shape.split()[0] for shape in first} == shapes
    assert all(kernel.startswith("cpp template (CppMicroGemm") for kernel in first.values()), first
    assert all(shape.endswith(" float32/float32") for shape in first), first
    second, _ = compiled_step_kernels(tiny_model(vocab_size=256)[0])  # another model, the same shapes:
    assert second == first  # compiled anew (a graph is tied to its model), the same kernels
