"""llama/generation/generator.py: Meta's API on real SmolLM2 weights against HF transformers (teacher-forced),
ragged batches against single-sequence runs, stopping, streaming, and requests refused with the fix.
Sampling: test_sampling.py; compile, int8 and memory: test_generation_speed.py; model parallel:
test_generation_parallel.py. Shared fixtures (smollm2, hf_smollm2, tiny_dir): conftest.py."""

import pytest
import torch

from llama.generation import Llama, cache_slot
from llama.model import ModelArgs, Transformer

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a little robot"]
N_NEW = 64


# ---------------------------------------------------------------------------- against HF


def hf_log_softmax(hf_model, seq):
    """HF's next-token log-probabilities after every prefix of `seq`: one teacher-forced forward, (T, V)."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([seq])).logits[0].double(), -1)


def is_greedy_choice(ref_row, token, tie=1e-3):
    """`token` is the argmax of HF's log-probabilities, or within `tie` of it (a near-tie that either
    CPU's rounding may break either way)."""
    return ref_row[token] >= ref_row.max() - tie


def test_greedy_text_matches_hf(smollm2, hf_smollm2, hf_smollm2_tokenizer):
    """Our greedy continuations (one ragged batch, KV-cache decoding) are HF's greedy choice at every
    position, teacher-forced: one HF forward per prompt over prompt + our continuation. Each chosen
    token's log-probability matches HF's, and a sequence stops exactly where HF's argmax is a stop token."""
    prompt_tokens = [smollm2.encode_prompt(p) for p in PROMPTS]
    assert prompt_tokens == [hf_smollm2_tokenizer(p)["input_ids"] for p in PROMPTS]
    ours, logprobs = smollm2.generate(prompt_tokens, N_NEW, temperature=0, logprobs=True)
    stop = set(smollm2.tokenizer.stop_tokens)
    for ids, mine, lp in zip(prompt_tokens, ours, logprobs):
        ref = hf_log_softmax(hf_smollm2, ids + mine)[len(ids) - 1 :]  # row i predicts mine[i]
        assert not stop & set(mine)
        for i, token in enumerate(mine):
            assert is_greedy_choice(ref[i], token), (i, token, ref[i].argmax().item())
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.double), ref[torch.arange(len(mine)), mine],
                                   atol=1e-4, rtol=0)
        if len(mine) < N_NEW:  # ended on its own: HF's greedy next token is a stop token
            assert any(is_greedy_choice(ref[len(mine)], s) for s in stop), ref[len(mine)].argmax().item()
        assert smollm2.tokenizer.decode(mine) == hf_smollm2_tokenizer.decode(mine)
    assert max(len(t) for t in ours) == N_NEW


def test_logprobs_match_hf_log_softmax(smollm2, hf_smollm2):
    prompt = smollm2.encode_prompt(PROMPTS[0])
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
    prompts = [smollm2.encode_prompt("Hi"), chat, smollm2.encode_prompt("The three primary colors are red, yellow and")]
    batch, _ = smollm2.generate(prompts, 20, temperature=0)
    for p, got in zip(prompts, batch):
        alone, _ = smollm2.generate([p], 20, temperature=0)
        assert got == alone[0]
    assert len(batch[1]) < 20  # the chat answer ended on its own stop token (<|im_end|>) ...
    assert len(batch[0]) == 20  # ... while the others ran on
    raw = list(smollm2.generate_tokens([chat], 20, temperature=0))
    assert raw[-1].done and raw[-1].id in tok.stop_tokens and len(raw) == len(batch[1]) + 1


def test_stream_pieces_join_to_the_text(smollm2):
    prompts = [smollm2.encode_prompt("Write the word café three times:"), smollm2.encode_prompt("2, 4, 8,")]
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


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny32(tiny_dir):
    """Built once for the requests below, which only read it: room for 32 positions, 2 sequences."""
    return Llama.build(tiny_dir, max_seq_len=32, max_batch_size=2)


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
def test_bad_requests_are_refused_with_the_fix(tiny32, kwargs, words):
    request = dict(prompt_tokens=[[1, 2]], max_gen_len=4, temperature=0.6, top_p=0.9) | kwargs
    with pytest.raises(ValueError, match=words):
        tiny32.generate(**request)


def test_truncation_only_when_asked(tiny32):
    llama = tiny32
    long_text = "word " * 60
    with pytest.raises(ValueError, match="truncat"):
        llama.text_completion([long_text], max_gen_len=4)
    out = llama.text_completion([long_text], max_gen_len=4, temperature=0, truncate=True)
    assert len(out) == 1
