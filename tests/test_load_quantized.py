"""Loading straight into int8/int4 (llama/checkpoint/load.py with quantize=...): the layers equal
quantizing the loaded float model, GGUF Q8_0/Q4_0 blocks are used as the file stores them (checked
against the gguf package's own dequantization), model parallelism gives one process's logits, and
peak memory stays at the quantized weights (the float model never exists)."""

import importlib.util
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from llama import parallel
from llama.checkpoint import load_model, save_hf, save_meta
from llama.generation import quantize
from llama.model import ModelArgs, Transformer
from tests.helpers import ROOT, run_distributed, tiny_model, tokens, write_gguf

Q = gguf.GGMLQuantizationType
ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=96, rope_theta=10000.0,
            max_seq_len=64)


def mapped_file(t: torch.Tensor):
    """The file whose memory map holds t's bytes (/proc/self/maps), or None."""
    address = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 else None
    return None


def quantized_buffers(model) -> dict:
    return {name: b for name, b in model.named_buffers() if name.endswith((".weight", "scales", "zeros"))}


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_loading_into_a_scheme_equals_quantizing_the_loaded_model(method, tmp_path):
    """HF (bf16, with the q/k permutation) and a Meta checkpoint saved in 2 shards, loaded with
    quantize=...: the codes, scales and zeros are bit for bit those of quantize_model on the float
    model loaded from the same files, so the logits are equal too."""
    model, args = tiny_model(**ARGS)
    save_hf(model.state_dict(), args, tmp_path / "hf", dtype=torch.bfloat16)
    save_meta(model.state_dict(), args, tmp_path / "meta2", num_shards=2)
    for path in (tmp_path / "hf", tmp_path / "meta2"):
        at_load = load_model(path, quantize=method, group_size=32)
        after = quantize.quantize_model(load_model(path), method, 32)
        got, expected = quantized_buffers(at_load), quantized_buffers(after)
        assert got.keys() == expected.keys() and len(got) >= 15
        for name in got:
            assert torch.equal(got[name], expected[name]), (path.name, name)
        assert isinstance(at_load.output, quantize.GroupInt8Linear) and at_load.output.group_size == 32  # HEAD_METHOD
        with torch.no_grad():
            assert torch.equal(at_load(tokens(vocab=256)), after(tokens(vocab=256)))


def test_quantizers_equal_the_torch_reference(monkeypatch):
    """The kernel file's quantizers (one pass, C++) give int8_codes / int4_codes (torch) bit for bit,
    from float32, bf16 and fp16 weights and from a view that is part of wider rows (a row-parallel
    rank's columns)."""
    torch.manual_seed(0)
    wide = torch.randn(37, 640) * 0.05
    wide[2, 5] = 3.0  # an outlier in one group
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for w in (wide.to(dtype), wide.to(dtype)[:, 128:384]):
            for group in (32, 64, 128):
                int8 = quantize.GroupInt8Linear(w, group)
                ref_codes, ref_scales = quantize.int8_codes(w.float(), group)
                assert torch.equal(int8.weight, ref_codes) and torch.equal(int8.scales, ref_scales), (dtype, group)
                int4 = quantize.Int4Linear(w, group)
                ref_codes, ref_scales, ref_zeros = quantize.int4_codes(w.float(), group)
                assert torch.equal(int4.weight, quantize.pack_int4(ref_codes)), (dtype, group)
                assert torch.equal(int4.scales, ref_scales) and torch.equal(int4.zeros, ref_zeros), (dtype, group)
    monkeypatch.setattr(quantize, "ROWS_AT_ONCE", 5 * 640)  # pieces of 5 rows, the last 2
    for method, cls in (("int8", quantize.GroupInt8Linear), ("int4", quantize.Int4Linear)):
        whole = cls(wide, 32)
        layer = quantize.quantize_rows(lambda start, end: wide[start:end], tuple(wide.shape), method, 32, "w")
        assert all(torch.equal(a, b) for a, b in zip(layer.buffers(), whole.buffers()))


@pytest.mark.parametrize("method, qtype", [("int8", Q.Q8_0), ("int4", Q.Q4_0)])
def test_gguf_blocks_are_used_as_the_file_stores_them(method, qtype, tmp_path):
    """A Q8_0 / Q4_0 file loaded with int8 / int4: every linear layer and the embedding table are the
    file's own blocks (a view of its bytes: nothing copied), which the kernel reads as the gguf package dequantizes them,
    exactly; the logits are the float model's of the same file within what rounding the activations
    moves them. An explicit group size other than 32 requantizes into our layout instead."""
    model, args = tiny_model(**{**ARGS, "hidden_dim": 128})
    path = write_gguf(tmp_path / "q.gguf", model.state_dict(), args, qtype)
    loaded = load_model(path, quantize=method)
    reference = load_model(path)  # float32, dequantized by the gguf package
    layers = [m for m in loaded.modules() if isinstance(m, quantize.GroupLinear)]
    assert len(layers) == 7 * 2 + 1 and all(isinstance(m, quantize.GGUFLinear) for m in layers)
    assert isinstance(loaded.tok_embeddings, quantize.GGUFEmbedding)  # the table too, rows dequantized on lookup
    if sys.platform.startswith("linux"):  # the file's pages, not a copy
        assert all(mapped_file(m.weight) == str(path) for m in layers) and mapped_file(loaded.tok_embeddings.table) == str(path)
    for name, m in loaded.named_modules():
        if isinstance(m, quantize.GGUFLinear):
            torch.testing.assert_close(m.dequantized(), reference.get_submodule(name).weight, rtol=0, atol=0)
    long = tokens(2, 40, vocab=256)  # a prefill chunk of 80 rows: the GEMM on the dequantized blocks
    assert long.numel() > quantize.PREFILL_ROWS
    with torch.no_grad():  # and 4 decode rows: the kernel
        expected = reference(long)
        for dtype in (torch.float32, torch.bfloat16):  # Q4_0's GEMM: bf16 where the CPU has bf16 instructions
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(quantize, "GEMM_DTYPE", dtype)
                got, gemm = loaded(long), loaded.layers[0].attention.wq.gemm_dtype()
            if gemm == torch.float32:
                torch.testing.assert_close(got, expected)
            else:  # int4 in bf16: within bf16's rounding of activations and weights
                assert 0 < (got - expected).abs().max() < 0.01 * expected.abs().max()
        ours, ref = loaded(tokens(1, 4, vocab=256)), reference(tokens(1, 4, vocab=256))
    assert 0 < (ours - ref).abs().max() < (0.01 if method == "int8" else 0.05) * ref.abs().max()
    requantized = load_model(path, quantize=method, group_size=64)
    assert isinstance(requantized.layers[0].attention.wq, (quantize.GroupInt8Linear, quantize.Int4Linear))


def test_a_gguf_larger_than_the_memory_the_os_commits_is_mapped_read_only(tmp_path, monkeypatch):
    """The OS refuses a private (copy-on-write) map larger than the memory it will commit: 70B's 40 GB of
    Q4_0 on a 23 GB machine failed with ENOMEM before anything was read, even the tokenizer. Such a
    file is mapped read-only (here the refusal is the OS's stand-in; bench/synthetic.py --shape 70b
    runs the real one): the same logits, the Q4_0 blocks views of the file, the float tensors copies
    that a caller may write."""
    import errno
    import mmap
    from llama.checkpoint.gguf import GGUFFile
    model, args = tiny_model(**ARGS)
    path = write_gguf(tmp_path / "q.gguf", model.state_dict(), args, Q.Q4_0)
    ids = tokens(2, 9, vocab=256)
    with torch.no_grad():
        expected = load_model(path, quantize="int4")(ids)
    private = mmap.mmap

    def refuse_private(fileno, length, access=mmap.ACCESS_WRITE, **kwargs):
        if access == mmap.ACCESS_COPY:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return private(fileno, length, access=access, **kwargs)

    monkeypatch.setattr(mmap, "mmap", refuse_private)
    assert not GGUFFile(path).writable
    loaded = load_model(path, quantize="int4")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), expected, rtol=0, atol=0)
    layers = [m for m in loaded.modules() if isinstance(m, quantize.GGUFLinear)]
    assert layers and all(mapped_file(m.weight) == str(path) for m in layers)
    with torch.no_grad():
        loaded.norm.weight.mul_(2)  # a copy: writing it neither faults nor reaches the file
    assert mapped_file(loaded.norm.weight) != str(path)
    torch.testing.assert_close(load_model(path).norm.weight, model.norm.weight, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_int4_takes_a_q4_0_files_8_bit_output_matrix_as_it_is(tied, tmp_path):
    """llama.cpp's Q4_0 files keep the output matrix (or the tied embedding table: SmolLM2's) at Q8_0;
    --quantize int4 keeps the output projection at 8 bits (HEAD_METHOD), so it takes those blocks as
    they are, a view of the file, beside the body's Q4_0 ones: the logits are the float model's of the
    same file within what rounding the activations moves them."""
    model, args = tiny_model(**{**ARGS, "hidden_dim": 128, "tie_word_embeddings": tied})
    eight_bit = "tok_embeddings.weight" if tied else "output.weight"
    path = write_gguf(tmp_path / "q.gguf", model.state_dict(), args, Q.Q4_0, qtypes={eight_bit: Q.Q8_0})
    loaded, reference = load_model(path, quantize="int4"), load_model(path)
    kinds = {name: m.kind for name, m in loaded.named_modules() if isinstance(m, quantize.GGUFLinear)}
    assert kinds.pop("output") == "Q8_0" and len(kinds) == 7 * 2 and set(kinds.values()) == {"Q4_0"}
    if sys.platform.startswith("linux"):
        assert mapped_file(loaded.output.weight) == str(path)
    torch.testing.assert_close(loaded.output.dequantized(), reference.output.weight, rtol=0, atol=0)
    with torch.no_grad():
        ours, ref = loaded(tokens(1, 4, vocab=256)), reference(tokens(1, 4, vocab=256))
    assert 0 < (ours - ref).abs().max() < 0.05 * ref.abs().max()


def _mp_logits(path, method, mp=None):
    if mp:
        parallel.init_distributed(mp)
    model = load_model(path, quantize=method)
    with torch.no_grad():
        return model(tokens(vocab=256))


@pytest.mark.slow
def test_gguf_blocks_under_model_parallelism_give_one_process_logits(tmp_path):
    """At model parallel 2 each rank keeps its share of the file's blocks, views of the file: the
    column-parallel rows, and the row-parallel columns in whole blocks (wo: 32 of 64, w2: 64 of 128).
    Logits equal one process's within fp32 rounding of the summed partial products."""
    model, args = tiny_model(**{**ARGS, "hidden_dim": 128})
    for method, qtype in (("int8", Q.Q8_0), ("int4", Q.Q4_0)):
        path = write_gguf(tmp_path / f"{method}.gguf", model.state_dict(), args, qtype)
        one = _mp_logits(path, method)
        for logits in run_distributed(_mp_logits, 2, path, method, 2):
            torch.testing.assert_close(logits, one, rtol=1e-4, atol=1e-4)


CHILD_SPEC = importlib.util.spec_from_file_location("load_memory", ROOT / "bench" / "load_memory.py")


def test_loading_into_int4_peaks_at_the_quantized_weights(tmp_path):
    """An HF bf16 checkpoint (~54 MB) loaded into int4 in a fresh process: peak
    resident memory above the process's baseline is the int4 model (codes, scales, zeros, and the
    embedding in bf16) plus a small margin, far below the bf16 weights alone (what building the
    float model first costs), with every page of the result read."""
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=4096, hidden_dim=1536,
                     rope_theta=500000.0, max_seq_len=64)
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    state = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen) for k, s in shapes.items()}
    save_hf(state, args, tmp_path)
    float_bytes = sum(t.numel() * 2 for t in state.values())
    bench = importlib.util.module_from_spec(CHILD_SPEC)
    CHILD_SPEC.loader.exec_module(bench)
    r = bench.measure("ours", tmp_path, "bfloat16", "int4")
    assert float_bytes > 2.5 * r["weights"]  # the test can tell the two apart
    assert r["weights_read"] <= 1.15 and r["during_load"] <= 1.15, r


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_kernel_dequantizes_gguf_types_as_the_gguf_package(qtype):
    """The kernel file's dequantizers (loading a GGUF file into int8/int4 or a model's embedding)
    give the gguf package's numbers (llama.cpp's arithmetic, in numpy) on random blocks, with the
    fp16 scales forced finite (any other bytes are valid)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, size=(5, 3 * size), dtype=np.uint8)
    scale_bytes = {Q.Q8_0: [0, 1], Q.Q4_0: [0, 1], Q.Q4_K: [0, 1, 2, 3], Q.Q5_K: [0, 1, 2, 3], Q.Q6_K: [208, 209]}
    blocks = raw.reshape(5, 3, size)
    for b in scale_bytes[qtype][1::2]:
        blocks[:, :, b] &= 0x3B  # fp16 high byte: exponent below 15, so |d| < 2
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())
    got = quantize.dequantize_gguf(torch.from_numpy(blocks), qtype.name)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_planner_counts_what_a_quantized_load_stores(tmp_path):
    """`python -m llama.plan`'s "Q8_0 file" / "Q4_0 file" weights are the bytes the loader keeps for such a
    file (its blocks: the matrices and the embedding table; norms aside, < 1%), so the planner's laptop
    row and the measured 8B run (docs/quantization.md) describe the same storage."""
    from llama.plan import make_plan

    model, args = tiny_model(**{**ARGS, "dim": 256, "hidden_dim": 512, "n_heads": 8, "n_kv_heads": 4})
    for method, qtype in (("int8", Q.Q8_0), ("int4", Q.Q4_0)):
        loaded = load_model(write_gguf(tmp_path / f"{method}.gguf", model.state_dict(), args, qtype), quantize=method)
        stored = sum(b.numel() * b.element_size() for b in loaded.buffers() if b.dtype == torch.uint8)
        planned = make_plan(args, gpu="laptop", seq=64).memory[f"weights {qtype.name} file"]
        assert stored == pytest.approx(planned, rel=0.01), (method, stored, planned)
