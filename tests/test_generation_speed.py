"""Generation's opt-in speed and memory machinery (llama/generation/compile.py, llama/generation/quantize.py through
Llama.build): int8 weights, compiled decoding against eager, the prefill's allocator reuse and its
peak memory on a long prompt."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from llama.generation import Llama, cache_slot, mark_cache_dynamic
from tests.helpers import tiny_checkpoint


# ---------------------------------------------------------------------------- speed options


def test_int8_weights_keep_the_model_close(tiny_dir):
    from llama.generation.quantize import Int8Linear

    llama = Llama.build(tiny_dir, max_seq_len=64, max_batch_size=2)
    prompts = [[128000, 791, 6864, 315, 9822], [128000, 40]]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        ref = llama.model(ids)
    expected = llama.generate(prompts, 12, temperature=0)[0]
    # group_size=0: one scale per row, this class (the grouped kinds: tests/test_quantize.py)
    quantized = Llama.build(tiny_dir, max_seq_len=64, max_batch_size=2, quantize="int8", group_size=0)
    assert isinstance(quantized.model.output, Int8Linear) and quantized.model.output.weight.dtype == torch.int8
    with torch.no_grad():
        got = quantized.model(ids)
    assert (got - ref).abs().max() < 0.05 * ref.std()  # absmax int8 rows: ~0.4% weight error
    assert quantized.generate(prompts, 12, temperature=0)[0] == expected


def test_int8_linear_takes_the_float_gemm_for_many_rows():
    """Both paths compute x (W_int8 * scale)^T: a prefill chunk (> PREFILL_ROWS fp32 rows) exactly,
    through a dequantized fp32 GEMM; a decode step through the int8 kernel, with bf16 activations."""
    from llama.generation.quantize import PREFILL_ROWS, Int8Linear

    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(96, 80, bias=False).weight)
    per_row = PREFILL_ROWS // 2 + 8
    x = torch.randn(2, per_row, 96)
    exact = x.double() @ (layer.weight.double() * layer.scales.double()[:, None]).T
    many = layer(x)  # PREFILL_ROWS + 16 rows
    few = torch.cat([layer(x[:, i : i + 4]) for i in range(0, per_row, 4)], dim=1)  # 8 rows per call
    scale = exact.abs().max()
    assert (many - exact).abs().max() < 1e-5 * scale
    assert 1e-5 * scale < (few - exact).abs().max() < 2e-2 * scale  # the int8 kernel's bf16 rounding


@pytest.mark.slow
def test_compiled_decoding_equals_eager(tiny_dir, template_gemm):
    prompts = [[128000, 791, 6864], [128000, 40, 1093, 374, 264]]
    eager = Llama.build(tiny_dir, max_seq_len=512, max_batch_size=2).generate(prompts, 10, temperature=0)[0]
    compiled = Llama.build(tiny_dir, max_seq_len=512, max_batch_size=2, compile=True)
    assert compiled.generate(prompts, 10, temperature=0)[0] == eager
    graphs = counters["stats"]["unique_graphs"]
    longer = compiled.generate(prompts, 20, temperature=0)[0]  # a 25-slot cache instead of 15: same graph
    assert [t[:10] for t in longer] == eager
    compiled.generate([prompts[1][:2], prompts[0]], 5, temperature=0)
    assert counters["stats"]["unique_graphs"] == graphs  # the cache length is dynamic: no recompile per request
    alone = compiled.generate(prompts[:1], 10, temperature=0)[0]  # batch 1: its own cache and graph
    assert alone == eager[:1]
    graphs = counters["stats"]["unique_graphs"]
    assert compiled.generate(prompts, 10, temperature=0)[0] == eager  # back to batch 2: no recompile
    assert compiled.generate(prompts[1:], 4, temperature=0)[0] == [eager[1][:4]]
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_two_compiled_models_keep_their_own_weights(tmp_path, llama3_tokenizer_path, template_gemm):
    """Compiled steps freeze the weights into the graph: a second Llama in the same process (same
    code, same shapes) must run its own weights, not the first one's graph."""
    prompts = [[128000, 791, 6864]]
    dirs = [tiny_checkpoint(tmp_path / f"m{seed}", llama3_tokenizer_path, seed=seed) for seed in (0, 1)]
    eager = [Llama.build(d, max_seq_len=64, max_batch_size=1).generate(prompts, 8, temperature=0)[0] for d in dirs]
    assert eager[0] != eager[1]
    compiled = [Llama.build(d, max_seq_len=64, max_batch_size=1, compile=True) for d in dirs]
    assert [c.generate(prompts, 8, temperature=0)[0] for c in compiled] == eager
    assert [c.generate(prompts, 8, temperature=0)[0] for c in reversed(compiled)] == eager[::-1]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compiled_decode_step_matches_eager_step(tiny_dir, quantize, template_gemm):
    """The compiled step (C++ GEMM templates, frozen weights; int8 stays int8) gives the
    eager step's logits, teacher-forced from the same cache."""
    llama = Llama.build(tiny_dir, max_seq_len=512, max_batch_size=2, compile=True, quantize=quantize)
    prompts = [[128000, 791, 6864, 315], [128000, 40]]
    llama.generate(prompts, 3, temperature=0)  # compiles
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        cache = llama.model.make_cache(2, 40)  # another length than the request above: the same graph
        mark_cache_dynamic(cache)
        for b, p in enumerate(prompts):
            llama._prefill(p, cache_slot(cache, b), None)
        tokens, positions = torch.tensor([[9822], [1093]]), torch.tensor([4, 2])
        got = llama._decode(tokens, positions, cache)
        want = llama._decode_step(tokens, positions, cache)  # rewrites the same slots with the same k, v
    assert got.shape == want.shape == (2, llama.model.params.vocab_size)
    assert counters["stats"]["unique_graphs"] == graphs
    tol = 1e-4 if quantize is None else 2e-2  # int8: bf16 activations, another summation order
    assert (got - want).abs().max() <= tol * want.abs().max()


# ---------------------------------------------------------------------------- memory


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from llama.generation import Llama
    from llama.model import ModelArgs, Transformer
    torch.set_num_threads(1)

    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    from llama.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(sys.argv[1])
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                     hidden_dim=4096, max_seq_len=131072, max_batch_size=8)
    model = Transformer(args)
    model.init_weights(0)
    prompt = torch.randint(0, 128000, (6000,)).tolist()
    for chunk in (256, 6000):
        llama = Llama(model, tokenizer, prefill_chunk=chunk)
        llama.generate([prompt[:5]], 2, temperature=0)  # warm-up: lazy allocations, thread pools
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
        before = rss_kb("VmRSS")
        llama.generate([prompt], 4, temperature=0)
        print(chunk, rss_kb("VmHWM") - before)
""")


def test_long_prompt_prefill_keeps_peak_memory_near_the_cache(llama3_tokenizer_path):
    """6000-token prompt, a model built for 128K x batch 8: cache and activations stay small."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(llama3_tokenizer_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak = {int(c): int(kb) * 1024 for c, kb in (line.split() for line in out.stdout.split("\n") if line)}
    cache_bytes = 2 * 2 * 6004 * 2 * 16 * 4  # layers x (k, v) x positions x kv heads x head_dim x fp32
    # a max_batch_size x max_seq_len cache would be 2.1 GB; full-prompt logits 3 GB; one
    # unchunked FFN activation 98 MB. Chunks of 256 keep the rise to the cache plus a few MB.
    assert peak[256] < cache_bytes + 40e6, peak
    assert peak[6000] > 150e6, peak  # the control: without chunking the measurement does see it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_prefill_reuses_activation_memory(smollm2):
    """With glibc's default thresholds each 512-token prefill faults ~75K pages of activations
    back in (about a quarter of its time on 2 cores); keep_freed_memory makes the next prefill
    reuse the freed blocks."""
    import resource

    from llama.generation.compile import keep_freed_memory

    assert keep_freed_memory()  # opt-in (generate.py and bench/ turn it on): a library import changes nothing
    prompt = list(range(1000, 1512))
    smollm2.generate([prompt], 1, temperature=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    smollm2.generate([prompt], 1, temperature=0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 5000, f"{faults} page faults in a repeated 512-token prefill"


# ---------------------------------------------------------------------------- bf16 weights on the CPU


@pytest.mark.parametrize("K", [64, 72, 4100])  # 72, 4100: a tail after the last full SIMD vector
def test_bf16_kernel_is_the_float_product_of_the_bf16_weights(K):
    """bf16_mm multiplies x by the bf16 weights in float32: a bf16 model's activations (bf16 values)
    within float32 rounding of the float64 product; other float32 activations within their rounding to
    bf16 (where the CPU multiplies bf16 pairs, as llama.cpp's BF16 product does); for 1-9 rows (passes
    of 4, 2 and 1), rows of W apart in memory (a view of a wider matrix, as a model-parallel shard or a
    mapped file's tensor can be)."""
    from llama.generation.kernels import kernels
    ops = kernels()
    torch.manual_seed(0)
    wide = torch.randn(37, K + 16).bfloat16()
    w = wide[:, 8:8 + K]  # rows K + 16 apart
    for rows in (1, 2, 3, 4, 5, 9):
        x = torch.randn(rows, K)
        scale = x.double().abs() @ w.double().abs().T  # what rounding each term relatively moves the sum by
        for xs, bound in ((x.bfloat16().float(), 1e-6), (x, 2**-8)):
            got = ops.bf16_mm(xs, w)
            assert got.dtype == torch.float32 and got.shape == (rows, 37)
            assert ((got - xs.double() @ w.double().T).abs() <= bound * scale).all(), (rows, bound)


def test_a_bf16_model_decodes_through_the_bf16_kernel(tmp_path, llama3_tokenizer_path):
    """Llama.build of a bf16 checkpoint on the CPU puts BF16Linear in every linear layer: a decode
    step's rows through the kernel, a prefill chunk's (> PREFILL_ROWS) through torch's bf16 GEMM; the
    logits are torch's own bf16 model's within bf16 rounding, and greedy decoding picks the same tokens.
    A float32 model keeps torch's layers."""
    from llama.generation.bf16 import BF16Linear
    from llama.generation.quantize import PREFILL_ROWS, linear_layers
    ckpt = tiny_checkpoint(tmp_path / "m", llama3_tokenizer_path)
    llama = Llama.build(ckpt, max_seq_len=128, max_batch_size=2, dtype="bfloat16")
    assert not linear_layers(llama.model)
    assert sum(isinstance(m, BF16Linear) for m in llama.model.modules()) == 2 * 7 + 1
    reference = Llama.build(ckpt, max_seq_len=128, max_batch_size=2, dtype="bfloat16")
    plain = Llama(_with_torch_products(reference.model), reference.tokenizer)  # the same weights in nn.Linear
    prompts = [[128000, 791, 6864, 315, 9822], [128000, 40]]
    long = torch.randint(0, 1000, (1, PREFILL_ROWS + 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ids in (torch.tensor([prompts[0]]), long):
            got, want = llama.model(ids), plain.model(ids)
            assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
    assert llama.generate(prompts, 10, temperature=0)[0] == plain.generate(prompts, 10, temperature=0)[0]
    assert linear_layers(Llama.build(ckpt, max_seq_len=128, max_batch_size=2).model)  # float32: torch's


def _with_torch_products(model):
    """The model with nn.Linear back in place of each BF16Linear (the same weight tensors)."""
    from llama.generation.bf16 import BF16Linear
    for name, module in list(model.named_modules()):
        if isinstance(module, BF16Linear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight = torch.nn.Parameter(module.weight, requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, linear)
    return model
