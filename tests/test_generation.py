"""llama/generation.py and llama/sampling.py: Meta's API on real SmolLM2 weights against HF
transformers, ragged batches against single-sequence runs, sampling statistics, bounded memory,
and model-parallel generation against a single process."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from llama.checkpoint import save_meta
from llama.generation import Llama, cache_slot, mark_cache_dynamic
from llama.model import ModelArgs, Transformer
from llama.sampling import restrict, sample
from tests.helpers import run_distributed

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a little robot"]
N_NEW = 64


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return Llama.build(smollm2_gguf, max_seq_len=1024, max_batch_size=4, device="cpu")


def hf_greedy(hf_model, ids, n):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


def until_stop(ids, stop):
    return ids[: next((i for i, t in enumerate(ids) if t in stop), len(ids))]


def tiny_checkpoint(out_dir, tokenizer_path, vocab_size=128256, seed=0, **overrides):
    """A Meta-layout checkpoint of a tiny random model, with a peaked output layer so that greedy
    choices are not near-ties, plus the tokenizer.model beside it."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32,
                     rope_theta=10000.0, **overrides)
    model = Transformer(args)
    model.init_weights(seed)
    with torch.no_grad():
        model.output.weight.mul_(30.0)
    save_meta(model.state_dict(), args, out_dir)
    shutil.copy(tokenizer_path, out_dir / "tokenizer.model")
    return out_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, llama3_tokenizer_path):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), llama3_tokenizer_path)


# ---------------------------------------------------------------------------- against HF


def test_greedy_text_matches_hf(smollm2, hf_smollm2, hf_smollm2_tokenizer):
    prompt_tokens = [smollm2._encode(p) for p in PROMPTS]
    assert prompt_tokens == [hf_smollm2_tokenizer(p)["input_ids"] for p in PROMPTS]
    ours, _ = smollm2.generate(prompt_tokens, N_NEW, temperature=0)  # one ragged batch
    stop = smollm2.tokenizer.stop_tokens
    for ids, mine in zip(prompt_tokens, ours):
        theirs = until_stop(hf_greedy(hf_smollm2, ids, N_NEW), stop)
        assert mine == theirs
        assert smollm2.tokenizer.decode(mine) == hf_smollm2_tokenizer.decode(theirs)
    assert max(len(t) for t in ours) == N_NEW


def test_logprobs_match_hf_log_softmax(smollm2, hf_smollm2):
    prompt = smollm2._encode(PROMPTS[0])
    tokens, logprobs = smollm2.generate([prompt], 12, temperature=0, logprobs=True, echo=True)
    seq = tokens[0]
    assert seq[: len(prompt)] == prompt and len(logprobs[0]) == len(seq)
    with torch.no_grad():
        ref = torch.log_softmax(hf_smollm2(torch.tensor([seq])).logits[0].float(), -1)  # (T, V)
    expected = [0.0] + ref[:-1].gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].tolist()
    torch.testing.assert_close(torch.tensor(logprobs[0]), torch.tensor(expected), atol=1e-4, rtol=0)
    new_only, lp_new = smollm2.generate([prompt], 12, temperature=0, logprobs=True)
    assert new_only[0] == seq[len(prompt):]
    torch.testing.assert_close(torch.tensor(lp_new[0]), torch.tensor(expected[len(prompt):]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- batches, stopping, streaming


def test_ragged_batch_equals_each_alone(smollm2):
    tok = smollm2.tokenizer
    chat = smollm2.encode_dialog([{"role": "user", "content": "What is 2+2? Answer with one number."}])
    prompts = [smollm2._encode("Hi"), chat, smollm2._encode("The three primary colors are red, yellow and")]
    batch, _ = smollm2.generate(prompts, 20, temperature=0)
    for p, got in zip(prompts, batch):
        alone, _ = smollm2.generate([p], 20, temperature=0)
        assert got == alone[0]
    assert len(batch[1]) < 20  # the chat answer ended on its own stop token (<|im_end|>) ...
    assert len(batch[0]) == 20  # ... while the others ran on
    raw = list(smollm2.generate_tokens([chat], 20, temperature=0))
    assert raw[-1].done and raw[-1].id in tok.stop_tokens and len(raw) == len(batch[1]) + 1


def test_stream_pieces_join_to_the_text(smollm2):
    prompts = [smollm2._encode("Write the word café three times:"), smollm2._encode("2, 4, 8,")]
    pieces = ["", ""]
    for seq, text, _ in smollm2.stream(prompts, 16, temperature=0):
        pieces[seq] += text
    tokens, _ = smollm2.generate(prompts, 16, temperature=0)
    assert pieces == [smollm2.tokenizer.decode(t) for t in tokens]
    stats = smollm2.stats
    assert stats.generated_tokens >= 2 and stats.time_to_first_token_s > 0 and stats.decode_tokens_per_s > 0


def test_streaming_leaves_autograd_to_the_caller(tiny_dir):
    """Inference mode covers the library's steps only: the caller's loop body, and its code while a
    generator is paused, can build autograd graphs."""
    llama = Llama.build(tiny_dir, max_seq_len=64, max_batch_size=1)
    layer, x = torch.nn.Linear(4, 4), torch.ones(1, 4)

    def caller_may_train():
        return not torch.is_inference_mode_enabled() and torch.is_grad_enabled() and layer(x).requires_grad

    prompt = [[128000, 791, 6864]]
    for stream in (llama.stream(prompt, 3, temperature=0), llama.generate_tokens(prompt, 3, temperature=0)):
        seen = 0
        for _ in stream:
            assert caller_may_train()
            seen += 1
        assert seen == 3
    paused = llama.generate_tokens(prompt, 3, temperature=0)
    next(paused)
    assert caller_may_train()
    paused.close()


def test_stop_tokens_come_from_one_place(tiny_dir):
    """generate, generate_tokens and stream all end a sequence at Llama.stop_tokens."""
    llama = Llama.build(tiny_dir, max_seq_len=64, max_batch_size=1)
    prompt = [[128000, 791, 6864]]
    free = llama.generate(prompt, 6, temperature=0)[0][0]
    stop_at = max(i for i, t in enumerate(free) if free.index(t) == i)  # the last id not seen before it
    assert stop_at > 0
    llama.tokenizer.stop_tokens = {free[stop_at]}
    assert llama.stop_tokens == {free[stop_at]}
    assert llama.generate(prompt, 6, temperature=0)[0][0] == free[:stop_at]
    streamed = [tok.id for tok in llama.generate_tokens(prompt, 6, temperature=0)]
    assert streamed == free[: stop_at + 1]  # the stop token itself is streamed, marked done
    assert [tok.id for _, _, tok in llama.stream(prompt, 6, temperature=0)] == streamed


def test_text_and_chat_completion_shapes(smollm2):
    out = smollm2.text_completion(["Paris is"], temperature=0, max_gen_len=4, logprobs=True)
    assert set(out[0]) == {"generation", "tokens", "logprobs"} and len(out[0]["tokens"]) == 4
    assert "".join(out[0]["tokens"]) == out[0]["generation"]
    reply = smollm2.chat_completion([[{"role": "user", "content": "Say hello."}]], temperature=0, max_gen_len=16)
    assert reply[0]["generation"]["role"] == "assistant" and reply[0]["generation"]["content"].strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_prefill_reuses_activation_memory(smollm2):
    """With glibc's default thresholds each 512-token prefill faults ~75K pages of activations
    back in (about a quarter of its time on 2 cores); keep_freed_memory makes the next prefill
    reuse the freed blocks."""
    import resource

    from llama.fast import keep_freed_memory

    assert keep_freed_memory()  # opt-in (generate.py and bench/ turn it on): a library import changes nothing
    prompt = list(range(1000, 1512))
    smollm2.generate([prompt], 1, temperature=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    smollm2.generate([prompt], 1, temperature=0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 5000, f"{faults} page faults in a repeated 512-token prefill"


def test_per_sequence_positions_equal_a_full_forward():
    """The decode path that lets a ragged batch share one cache: positions as a tensor (B,)."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=64)
    model = Transformer(args).eval()
    model.init_weights(1)
    seqs = [torch.randint(0, 97, (n,)) for n in (5, 11)]
    cache = model.make_cache(2, 16)
    with torch.no_grad():
        for b, s in enumerate(seqs):  # prefill all but the last token, each sequence alone
            model(s[None, :-1], 0, cache_slot(cache, b))
        got = model(torch.stack([s[-1:] for s in seqs]), torch.tensor([5 - 1, 11 - 1]), cache)[:, 0]
        for b, s in enumerate(seqs):
            torch.testing.assert_close(got[b], model(s[None])[0, -1], atol=1e-5, rtol=1e-5)


def test_cache_is_sized_to_the_request(tiny_dir, monkeypatch):
    llama = Llama.build(tiny_dir, max_seq_len=4096, max_batch_size=8)
    sizes = []
    make_cache = llama.model.make_cache
    monkeypatch.setattr(llama.model, "make_cache", lambda b, n, **kw: sizes.append((b, n)) or make_cache(b, n, **kw))
    llama.generate([[1, 2, 3], list(range(1, 12))], max_gen_len=5, temperature=0)
    assert sizes == [(2, 11 + 5)]


# ---------------------------------------------------------------------------- sampling


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


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt_tokens=[]), "no prompts"),
    (dict(prompt_tokens=[[1]] * 3), "max_batch_size=2"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_gen_len=0), "max_gen_len"),
    (dict(prompt_tokens=[list(range(1, 40))]), "max_seq_len=32"),
    (dict(prompt_tokens=[[]]), "empty"),
    (dict(prompt_tokens=[[5, 10**7]]), "token ids"),
])
def test_bad_requests_are_refused_with_the_fix(tiny_dir, kwargs, words):
    llama = Llama.build(tiny_dir, max_seq_len=32, max_batch_size=2)
    request = dict(prompt_tokens=[[1, 2]], max_gen_len=4, temperature=0.6, top_p=0.9) | kwargs
    with pytest.raises(ValueError, match=words):
        llama.generate(**request)


def test_truncation_only_when_asked(tiny_dir):
    llama = Llama.build(tiny_dir, max_seq_len=32, max_batch_size=1)
    long_text = "word " * 60
    with pytest.raises(ValueError, match="truncat"):
        llama.text_completion([long_text], max_gen_len=4)
    out = llama.text_completion([long_text], max_gen_len=4, temperature=0, truncate=True)
    assert len(out) == 1


# ---------------------------------------------------------------------------- speed options


def test_int8_weights_keep_the_model_close(tiny_dir):
    from llama.quantize import Int8Linear

    llama = Llama.build(tiny_dir, max_seq_len=64, max_batch_size=2)
    prompts = [[128000, 791, 6864, 315, 9822], [128000, 40]]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        ref = llama.model(ids)
    expected = llama.generate(prompts, 12, temperature=0)[0]
    quantized = Llama.build(tiny_dir, max_seq_len=64, max_batch_size=2, quantize="int8")
    assert isinstance(quantized.model.output, Int8Linear) and quantized.model.output.weight.dtype == torch.int8
    with torch.no_grad():
        got = quantized.model(ids)
    assert (got - ref).abs().max() < 0.05 * ref.std()  # absmax int8 rows: ~0.4% weight error
    assert quantized.generate(prompts, 12, temperature=0)[0] == expected
    with pytest.raises(ValueError, match="int4"):
        Llama.build(tiny_dir, max_seq_len=64, quantize="int4")


def test_int8_linear_takes_the_float_gemm_for_many_rows():
    """Both paths compute x (W_int8 * scale)^T: a prefill chunk (> 32 fp32 rows) exactly, through
    a dequantized fp32 GEMM; a decode step through the int8 kernel, with bf16 activations."""
    from llama.quantize import Int8Linear

    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(96, 80, bias=False).weight)
    x = torch.randn(2, 32, 96)
    exact = x.double() @ (layer.weight.double() * layer.scales.double()[:, None]).T
    many = layer(x)  # 64 rows
    few = torch.cat([layer(x[:, i : i + 4]) for i in range(0, 32, 4)], dim=1)  # 8 rows per call
    scale = exact.abs().max()
    assert (many - exact).abs().max() < 1e-5 * scale
    assert 1e-5 * scale < (few - exact).abs().max() < 2e-2 * scale  # the int8 kernel's bf16 rounding


@pytest.fixture
def template_gemm(monkeypatch):
    """Compile as --compile does (frozen, pre-blocked weights, concat-linear) but take inductor's C++
    GEMM template untimed: max-autotune's timing belongs to bench/, not to correctness tests."""
    monkeypatch.setenv("LLAMA_COMPILE_GEMM", "template")


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
