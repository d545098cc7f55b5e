"""llama/generation/compile.py: the compiled decode step takes its kernels by rule and says which it took."""

import pytest
import torch

from llama.generation.compile import compile_decode_step, keep_argument_guards, mark_cache_dynamic
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


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)

    def forward(self, x):
        y = x @ self.weight.T
        torch._dynamo.graph_break()  # as fairscale's in-place all-reduce did under model parallelism
        return torch.tanh(y)


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer() for _ in range(3))

    def step(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.slow  # compiles
def test_dropped_guards_never_let_one_layer_run_anothers_frozen_weights():
    """After a graph break Dynamo resumes in _Layer.forward's own frame, code shared by every layer:
    only the guards on `self` tell layer 0 from layer 2 there, so the guard filter keeps them (with
    them dropped, every layer ran the first one's frozen weights)."""
    stack = _Stack()
    compiled = compile_decode_step(stack.step, torch.device("cpu"), gemm="aten")
    x = torch.randn(2, 8)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), stack.step(x))
        torch.testing.assert_close(compiled(2 * x), stack.step(2 * x))


def test_guard_filter_drops_only_the_steps_own_attributes():
    """In the step's frame (its `self` is the engine) the guards inside `self` go and the guards on the
    arguments stay; in any other frame every guard stays."""
    from torch._dynamo.types import GuardFilterEntry

    engine, layer = _Stack(), _Layer()

    def entry(name, value=None):
        return GuardFilterEntry(name=name, has_value=value is not None, value=value, guard_type="TYPE_MATCH",
                                derived_guard_types=(), is_global=False, orig_guard=None)

    names = ["self", "self.layers", "self.layers[0].weight", "tokens", "cache.k"]
    keep = keep_argument_guards(engine)
    assert keep([entry(n, engine if n == "self" else None) for n in names]) == [True, False, False, True, True]
    assert keep([entry(n, layer if n == "self" else None) for n in names]) == [True] * 5  # a resumed frame
    assert keep([entry(n) for n in names[3:]]) == [True, True]
    assert keep_argument_guards(None)([entry(n, engine if n == "self" else None) for n in names]) == [True] * 5
