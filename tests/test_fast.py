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


# ---------------------------------------------------------------------------- stale weights


def forced_logits(llama, prompt, forced, compiled: bool = True) -> torch.Tensor:
    """Teacher-forced logits (len(forced) + 1, V): the prompt's last position, then one decode step
    per forced token, through the compiled step (llama._decode) or the eager one."""
    with torch.inference_mode():
        cache = llama.model.make_cache(1, len(prompt) + len(forced) + 1)
        mark_cache_dynamic(cache)
        logits = [llama._prefill(prompt, cache_slot(cache, 0), None)]
        positions = torch.tensor([len(prompt)])
        step = llama._decode if compiled else llama._decode_step
        for t in forced:
            logits.append(step(torch.tensor([[t]]), positions, cache)[0])
            positions = positions + 1
    return torch.stack(logits)


@pytest.mark.slow  # compiles three times
def test_compiled_step_never_runs_stale_weights(template_gemm):
    """The compiled step runs frozen copies of the weights: after an in-place edit of every layer's w2
    (what a merge or a manual edit does) and after a replaced module, its next result equals the eager
    step's on the edited model (the step compiled again), and a warning names what changed."""
    import copy

    from llama.generation import compile as compile_module

    model, _ = tiny_model(1, vocab_size=256)
    llama = Llama(model, tokenizer=None, compile=True)
    prompt, forced = [1, 2, 3], [4, 5, 6, 7]
    before = forced_logits(llama, prompt, forced)
    torch.testing.assert_close(before, forced_logits(llama, prompt, forced, compiled=False))
    assignments = compile_module._assignments
    torch.testing.assert_close(forced_logits(llama, prompt, forced), before)
    assert compile_module._assignments == assignments  # decode steps assign nothing: the check stays on its fast path
    with torch.no_grad():
        for layer in model.layers:
            layer.feed_forward.w2.weight.mul_(1.5)
    with pytest.warns(UserWarning, match=r"layers\.0\.feed_forward\.w2\.weight was changed in place since"):
        edited = forced_logits(llama, prompt, forced)
    torch.testing.assert_close(edited, forced_logits(llama, prompt, forced, compiled=False))
    assert (edited - before).abs().max() > 1e-2  # the edit matters to the logits
    ffn = copy.deepcopy(model.layers[1].feed_forward)
    with torch.no_grad():
        ffn.w1.weight.neg_()
    model.layers[1].feed_forward = ffn
    with pytest.warns(UserWarning, match=r"layers\.1\.feed_forward\.w1\.weight was replaced since"):
        replaced = forced_logits(llama, prompt, forced)
    torch.testing.assert_close(replaced, forced_logits(llama, prompt, forced, compiled=False))
    assert (replaced - edited).abs().max() > 1e-2


def test_weight_watch_names_each_kind_of_change():
    """What the compiled step's watch sees, without compiling: in-place edits (version counters),
    reassigned storage (`.data =`), replaced modules and parameters, a replaced Llama.model; an
    assignment to another module of the process is no change."""
    from llama.generation.compile import WeightWatch

    model, _ = tiny_model(1)
    watch = WeightWatch(model)
    assert watch.change(model) is None and watch.change(model, full=True) is None
    other, _ = tiny_model(2)
    other.layers[0].feed_forward = copy_module(other.layers[1].feed_forward)  # elsewhere in the process
    assert watch.change(model) is None
    assert watch.change(other) == "Llama.model was replaced"
    with torch.no_grad():
        model.layers[1].attention.wo.weight.add_(1)
    assert watch.change(model) == "layers.1.attention.wo.weight was changed in place"
    cases = [
        (lambda m: setattr(m.layers[0].attention.wq.weight, "data", m.layers[0].attention.wq.weight.clone()),
         "layers.0.attention.wq.weight was reassigned"),
        (lambda m: setattr(m.layers[1], "feed_forward", copy_module(m.layers[1].feed_forward)),
         "layers.1.feed_forward.w1.weight was replaced"),
        (lambda m: setattr(m.norm, "weight", torch.nn.Parameter(m.norm.weight.detach().clone())),
         "norm.weight was replaced"),
    ]
    for edit, message in cases:
        model, _ = tiny_model(1)
        watch = WeightWatch(model)
        edit(model)
        assert watch.change(model, full=True) == message
        assert (watch.change(model) == message) == ("reassigned" not in message)  # `.data =`: per request only


def copy_module(module):
    import copy

    return copy.deepcopy(module)
