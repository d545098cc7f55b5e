"""Opt-in speed machinery for generation (llama/generation/generator.py calls it; nothing here runs on import):
compiling the decode step, the copies that make compiling safe, the watch that recompiles it when the
weights it froze change, and allocator tuning."""

import contextlib
import itertools
import math
import os
import re
import sys
import warnings
import weakref
from typing import List, Optional

import torch

from llama import parallel

GEMM_CHOICES = ("template", "autotune", "aten")


def compile_decode_step(step, device: torch.device, gemm: Optional[str] = None):
    """torch.compile for the decode step: one graph per batch size, for every cache length (the
    caller marks the cache's length dimension dynamic: see mark_cache_dynamic).

    On a CPU a decode step is ~210 matrix-vector products that read every weight once, so its speed
    is memory bandwidth. The default compile keeps calling MKL's GEMV, which on small matrices
    (576 x 1536 for SmolLM2) streams at ~8 GB/s on one thread however many it is given. Three
    inductor options fix that:
    - inductor's own C++ GEMM template (max_autotune's CPP backend) splits the output columns
      across all threads (~19 GB/s on 2 cores);
    - freezing treats the weights as constants, so the template stores them pre-blocked in the
      layout its micro-kernel reads (and int8 weights stay int8: see llama/generation/quantize.py);
    - with constant weights, concat-linear joins the products that read the same input (wq, wk,
      wv; w1, w3) into one, so a step runs 4 products per layer instead of 7.
    The graph runs the weights as they were when it compiled: CompiledStep (below) recompiles when
    they change.

    `gemm` (default: $LLAMA_COMPILE_GEMM, else "template") picks the products. "template": every
    product takes the C++ template, by rule, untimed: a decode step's products have B (batch) rows,
    bandwidth-bound at any B a generation batch has, where the template's split across threads wins.
    The same shapes get the same kernels on every run and host. "autotune" times the template
    against ATen per shape and keeps the faster: minutes of compiling, and on a shared CPU the
    timings are noise (a 2-thread template waits for a descheduled thread; MKL's single-threaded
    GEMV does not): on a loaded machine it took MKL for every product, so the step ran at MKL's
    one-thread speed (docs/performance.md). "aten" keeps ATen's products (freezing still on).
    The returned function's `kernels` maps each product's shape to the implementation inductor
    took (see KernelRecord).
    """
    gemm = gemm or os.environ.get("LLAMA_COMPILE_GEMM", "template")
    if gemm not in GEMM_CHOICES:
        raise ValueError(f"gemm={gemm!r} (LLAMA_COMPILE_GEMM): choose one of {', '.join(GEMM_CHOICES)}")
    if device.type != "cpu":
        return torch.compile(step, dynamic=False)
    import torch._inductor.config as inductor_config

    options = {"aten": {}, "autotune": {"max_autotune": True},
               # one candidate per product: inductor takes it without timing anything
               "template": {"max_autotune": True, "max_autotune_gemm_backends": "CPP"}}[gemm]
    # Dynamo checks its guards before every call: on the Llama and its module tree they are ~6,700
    # checks, ~2 ms of a SmolLM2 step. Frozen weights already pin the graph to the model as it was
    # compiled, so those guards protect nothing: keep_argument_guards drops them and keeps the guards
    # on the step's arguments (batch size, cache dtype and layout). Every compiled Llama compiles the
    # same function (Llama._decode_step): kept apart, each one's graphs are the only ones Dynamo
    # checks when it is called, so a second Llama never passes the first's guards (and shared, a
    # call would run through every other engine's guards before its own: docs/quantization.md).
    options["guard_filter_fn"] = keep_argument_guards(getattr(step, "__self__", None))
    compiled = torch.compile(step, dynamic=False, options=options, isolate_recompiles=True)
    settings = {
        "freezing": True, "cpp.enable_concat_linear": True,  # read outside `options`: patched per call
        # Autotuning prints a timing table per product to stderr, from every rank: keep the CLI clean.
        "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False,
        # A loop kernel (norms, RoPE, activations, attention) splits across threads only with >= 64K
        # elements per thread (inductor's default: 512): a decode step's are a few thousand, and each
        # split costs a thread wake-up (docs/quantization.md measures it).
        "cpp.min_chunk_size": 65536,
        # The step's ~500 kernel and op calls go through a C++ wrapper, not a Python one (~0.8 ms less
        # per SmolLM2 step in-process: docs/quantization.md). Not under model parallelism: its
        # wrapper cannot pass the collectives' process-group argument (inductor: "arg type Any").
        "cpp_wrapper": parallel.model_parallel_size() == 1,
        "post_grad_custom_post_pass": kernel_build_pass(),
    }
    record = KernelRecord()

    def run(*args):
        with inductor_config.patch(settings), record.listening():
            return compiled(*args)

    run.kernels = record.kernels
    return run


def kernel_build_pass():
    """A pass that changes nothing: its uuid, part of the key of inductor's cache of compiled graphs, is
    the int8/int4 kernels' build signature. The key does not cover custom ops' schemas, so a graph
    compiled (and cached on disk) before a kernel op gained an argument was reused after it, and called
    the new op with the old arguments: a segfault at the first compiled step."""
    from torch._inductor.custom_graph_pass import CustomGraphPass  # ~1 s to import: only when compiling

    from llama.generation.kernels import build_signature

    class KernelBuildInCacheKey(CustomGraphPass):
        def __call__(self, graph) -> None:
            pass

        def uuid(self) -> str:
            return build_signature()

    return KernelBuildInCacheKey()


class CompiledStep:
    """The compiled decode step of one engine (a Llama: `engine.model`, `engine._decode_step`), which
    never runs weights other than the model's own.

    A compiled graph runs frozen copies of the weights it was compiled with, and the guard filter
    drops Dynamo's checks on the model (keep_argument_guards): a change to the model after
    compiling would go unseen. WeightWatch sees it: every call checks the weights' version counters
    (an in-place edit: `w.mul_(2)`, `copy_`, `load_state_dict`, a LoRA merge) and whether a module,
    parameter or buffer was assigned (a replaced module, quantize_model, `Llama.model = ...`);
    `check()`, once per request, also compares each weight's storage, dtype and shape (`p.data = x`,
    `model.to(dtype)`). On a change the step is compiled again, with a warning naming what changed.
    Not seen: an edit through `.data` (`p.data.mul_(2)`), whose alias has a version counter of its
    own: edit weights in place under torch.no_grad(), or build a new Llama over the edited model."""

    def __init__(self, engine, device: torch.device):
        self.engine, self.device = engine, device
        self._compile()

    def _compile(self) -> None:
        own_storage(self.engine.model)
        self.fn = compile_decode_step(self.engine._decode_step, self.device)
        self.watch = WeightWatch(self.engine.model)

    @property
    def kernels(self) -> dict:
        return self.fn.kernels

    def __call__(self, *args):
        change = self.watch.change(self.engine.model)
        if change is not None:
            self._recompile(change)
        return self.fn(*args)

    def check(self) -> None:
        """The full comparison (each weight's storage, dtype, shape too): once per request."""
        change = self.watch.change(self.engine.model, full=True)
        if change is not None:
            self._recompile(change)

    def _recompile(self, change: str) -> None:
        warnings.warn(f"{change} since the decode step was compiled: compiling it again", stacklevel=3)
        # Every compiled graph goes, not only this step's: a graph Dynamo resumes after a graph
        # break lives on code shared by every layer and engine (one RowParallelLinear.forward), and
        # its guards on the module pass whatever the weights hold now. Other compiled models of
        # this process compile again on their next call.
        torch._dynamo.reset()
        self._compile()


_assignments = 0  # modules, parameters and buffers assigned to any module since the hooks went in


def _count_assignment(*_) -> None:
    global _assignments
    _assignments += 1


class WeightWatch:
    """What a compiled step froze: the model's parameters and buffers, by name, with their version
    counters (which every in-place op bumps) and storages. `change` says what changed, or None.
    The per-call check reads one version counter per tensor (its cost: docs/generation.md) and one
    counter of assignments, which process-wide hooks keep; the hooks go in with the first compiled
    step and only count."""

    hooks_installed = False

    def __init__(self, model: torch.nn.Module):
        if not WeightWatch.hooks_installed:
            from torch.nn.modules import module

            module.register_module_module_registration_hook(_count_assignment)
            module.register_module_parameter_registration_hook(_count_assignment)
            module.register_module_buffer_registration_hook(_count_assignment)
            WeightWatch.hooks_installed = True
        self.model, self.assignments = model, _assignments
        self.named = self._named(model)
        # inference tensors keep no version counter (reading it raises): their storage is compared
        self.tracked = [t for _, t in self.named if not t.is_inference()]
        self.versions = self._versions()
        self.storage = self._storage(self.named)

    @staticmethod
    def _named(model) -> list:
        return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]

    @staticmethod
    def _storage(named) -> List[tuple]:
        return [(t.data_ptr(), t.dtype, t.shape) for _, t in named]

    def _versions(self) -> List[int]:
        return [t._version for t in self.tracked]

    def change(self, model: torch.nn.Module, full: bool = False) -> Optional[str]:
        if model is not self.model:
            return "Llama.model was replaced"
        if full or _assignments != self.assignments:
            named = self._named(model)
            for (name, t), (was_name, was) in itertools.zip_longest(named, self.named, fillvalue=(None, None)):
                if name != was_name or t is not was:
                    return f"{was_name or name} was replaced"
            for (name, _), now, then in zip(named, self._storage(named), self.storage):
                if now != then:
                    return f"{name} was reassigned"
            self.assignments = _assignments  # an assignment elsewhere in the process
        versions = self._versions()
        if versions != self.versions:
            i = next(i for i, (a, b) in enumerate(zip(versions, self.versions)) if a != b)
            name = next(n for n, t in self.named if t is self.tracked[i])
            return f"{name} was changed in place"
        return None


def keep_argument_guards(owner):
    """guard_filter_fn for compile_decode_step: in the frame of the step itself (its `self` is
    `owner`), drop the guards on attributes of `self`; keep every other guard. A frame Dynamo
    resumes after a graph break runs code shared by every instance of a module (one
    RowParallelLinear.forward for all layers): there the guards on `self` tell the layers apart, so
    they stay (dropping them ran layer 0's frozen weights in every layer)."""
    owner = weakref.ref(owner) if owner is not None else (lambda: None)

    def keep(guards):
        engine = owner()
        in_step = engine is not None and any(g.name == "self" and g.has_value and g.value is engine for g in guards)
        return [not (in_step and g.name.startswith("self.")) for g in guards]

    return keep


class KernelRecord:
    """Which implementation inductor takes for each product while it compiles: "M x K -> N dtype"
    -> "cpp template (CppMicroGemmFP32Vec)", "aten _mkl_linear", ... (the bench prints it).
    Empty when the graph came from inductor's cache (nothing was lowered: run with
    TORCHINDUCTOR_FX_GRAPH_CACHE=0 to see it) or this torch has no selection hooks."""

    def __init__(self):
        self.kernels = {}

    @contextlib.contextmanager
    def listening(self):
        from torch._inductor import select_algorithm

        selector = getattr(select_algorithm, "get_algorithm_selector_cache", lambda: None)()
        hooks = [(getattr(selector, "preprocessing_fns", None), self._candidates),
                 (getattr(selector, "feedback_saver_fns", None), self._timed)]
        hooks = [(fns, fn) for fns, fn in hooks if fns is not None]
        for fns, fn in hooks:
            fns.append(fn)
        try:
            yield
        finally:
            for fns, fn in hooks:
                fns.remove(fn)

    def _candidates(self, choices):  # called before every selection, with what may be chosen
        if len(choices) == 1:  # taken without timing
            self._note(choices[0], kernel_name(choices[0]))
        return choices

    def _timed(self, timings, *_):  # called after autotuning with each candidate's time
        if timings:
            best = min(timings, key=timings.get)
            self._note(best, f"{kernel_name(best)} (autotuned)")

    def _note(self, choice, kernel: str) -> None:
        try:
            self.kernels[product_shape(choice)] = kernel
        except Exception:  # a record must never break compiling (an unexpected input layout)
            self.kernels.setdefault("unrecorded shapes", kernel)


def product_shape(choice) -> str:
    """"M x K -> N activation-dtype/weight-dtype" of a product inductor chooses a kernel for (the
    weight: the largest other input, whatever layout the kernel wants it in). A dynamic size
    prints as its symbol."""
    x, *others = choice.input_nodes
    m, k = (str(s) for s in x.get_size()[-2:])
    w = max(others, key=lambda node: math.prod(int(s) if str(s).isdigit() else 1 for s in node.get_size()),
            default=None)
    dtypes = "/".join(str(node.get_dtype()).removeprefix("torch.") for node in [x, w] if node is not None)
    return f"{m}x{k}->{choice.layout.size[-1]} {dtypes}"


def kernel_name(choice) -> str:
    name = re.sub(r"_\d+$", "", choice.name)  # inductor numbers each candidate it makes
    return f"cpp template ({name.removeprefix('cpp_')})" if name.startswith("cpp_") else f"aten {name}"


@torch.no_grad()
def own_storage(model: torch.nn.Module) -> None:
    """Copy each weight that is a view into a larger storage into a storage of its own, in place.

    Loaded weights often are such views: a mapped checkpoint file is one storage, and under model
    parallelism rank r's shard of a matrix starts r/M of the way into it. Inductor's C++ GEMM
    template, when it pre-blocks a frozen weight, re-views the weight's storage from the offset it
    records for the graph's constant, which is 0: on every rank but the first it read rank 0's rows
    (the gathered logits' upper half was a copy of the lower). A weight that owns its storage at
    offset 0 is read correctly. Costs one copy of only the affected weights (this rank's share).
    Quantized codes (integers) are read by our own kernel, which takes any offset: they stay views
    (a GGUF file's Q4_0 blocks in place, not copied)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for t in tensors:
        if not t.is_floating_point():
            continue
        if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t.data = t.detach().clone(memory_format=torch.contiguous_format)


def keep_freed_memory() -> bool:
    """Let the C allocator keep freed activation memory for reuse (Linux glibc; else a no-op).

    A prefill chunk allocates a few MB per activation (512 x 1536 floats for SmolLM2's FFN), tens
    of them per layer. glibc hands blocks that large to the kernel on free (mmap threshold, heap
    trimming), so every prefill faults its ~300 MB of activations back in, page by page, zeroed:
    ~75K page faults, a quarter of a 512-token prefill on 2 cores. Raising both thresholds keeps
    the freed blocks in the heap, where the next layer's activations reuse them: no faults after
    the first chunk. This is process-wide; the price is that up to 1 GB of freed memory stays
    with the process. Returns whether the setting took."""
    import ctypes

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 64 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def mark_cache_dynamic(cache) -> None:
    """Tell torch.compile that the cache length varies between requests: one decode graph then
    serves every request, each attending over its own request-sized cache (a fixed length would
    mean a recompile per length, or every request paying attention over the longest one)."""
    for layer in cache:
        torch._dynamo.mark_dynamic(layer.k, 2)
        torch._dynamo.mark_dynamic(layer.v, 2)
