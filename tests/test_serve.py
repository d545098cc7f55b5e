"""The OpenAI-compatible server (llama/serve/) through the real `openai` client, against a server
started here on 127.0.0.1: SmolLM2 (in this process, sharing the loaded model with Llama's API, the
reference) for text, and a scripted Llama-3-vocab model through `python -m llama.serve` for tool calls."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from llama.serve.app import create_app  # noqa: E402
from llama.serve.engine import Engine  # noqa: E402
from tests.helpers import scripted_checkpoint  # noqa: E402

DIALOG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(smollm2):
    """(base url, engine) of a server over the session's SmolLM2 (max_batch_size 4), in a thread."""
    engine = Engine(smollm2)
    engine.start_thread()
    server = uvicorn.Server(uvicorn.Config(create_app(smollm2, engine, "smollm2"), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1", engine
    server.should_exit = True
    thread.join(timeout=30)
    engine.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0], api_key="unused", max_retries=0, timeout=300)


def test_greedy_chat_equals_chat_completion(smollm2, client):
    r = client.chat.completions.create(model="smollm2", messages=DIALOG, temperature=0, max_tokens=12,
                                       logprobs=True, top_logprobs=3)
    ref = smollm2.chat_completion([DIALOG], temperature=0, max_gen_len=12, logprobs=True)[0]
    prompt = smollm2.encode_dialog(DIALOG)
    ref_ids, ref_lps = smollm2.generate([prompt], 12, temperature=0, logprobs=True)
    choice = r.choices[0]
    choice_ids = choice.model_extra["token_ids"]
    assert choice_ids == ref_ids[0] and choice.message.content == ref["generation"]["content"]
    assert r.usage.prompt_tokens == len(prompt)
    lps = [t.logprob for t in choice.logprobs.content]
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps[0]), atol=1e-4, rtol=0)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in choice.logprobs.content)
    assert choice.finish_reason == ("stop" if ref["generation"]["stop_reason"] == "end_of_turn" else "length")


@pytest.mark.slow
def test_stream_concatenates_to_the_same_text(client):
    kwargs = dict(model="smollm2", messages=DIALOG, temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    done = [c for c in client.completions.create(model="smollm2", prompt="Paris is", temperature=0, max_tokens=12,
                                                 stream=True)]
    plain = client.completions.create(model="smollm2", prompt="Paris is", temperature=0, max_tokens=12)
    assert "".join(c.choices[0].text for c in done) == plain.choices[0].text


@pytest.mark.slow
def test_completions_equal_text_completion_and_stop_strings(smollm2, client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=10,
                                  logprobs=2)
    ref = smollm2.text_completion(["The capital of France is"], temperature=0, max_gen_len=10, logprobs=True)[0]
    assert r.choices[0].text == ref["generation"] and r.choices[0].logprobs.tokens == ref["tokens"]
    torch.testing.assert_close(torch.tensor(r.choices[0].logprobs.token_logprobs), torch.tensor(ref["logprobs"]),
                               atol=1e-4, rtol=0)
    word = ref["generation"].split()[1]  # cut at the second word: the text before it, finish_reason stop
    cut = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0,
                                    max_tokens=10, stop=[word])
    assert cut.choices[0].text == ref["generation"][: ref["generation"].index(word)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_concurrent_requests_share_decode_steps_and_seeds_hold(client, served):
    """4 clients at once advance together (each decode step serves all of them); a seeded sampled
    request draws the same tokens alone or batched with others."""
    engine = served[1]
    prompts = ["1, 2, 3, 4,", "Once upon a time", "The history of Rome", "def fibonacci(n):"]  # long answers

    def ask(prompt, seed=None, temperature=0.0):
        r = client.completions.create(model="smollm2", prompt=prompt, temperature=temperature, max_tokens=24,
                                      seed=seed)
        return r.choices[0].model_extra["token_ids"], r.usage.completion_tokens

    alone = [ask(p) for p in prompts]
    before = engine.steps
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    steps = engine.steps - before
    assert [a[0] for a in together] == [a[0] for a in alone]
    tokens = sum(n for _, n in together)
    assert tokens > 60 and steps < 0.5 * tokens, (steps, tokens)  # one at a time: about a step per token
    seeded = ask(prompts[2], seed=7, temperature=1.0)
    with ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(lambda i: ask(prompts[2], seed=7 if i == 0 else None, temperature=1.0), range(4)))
    assert batched[0] == seeded


def test_bad_requests_are_4xx_and_the_server_keeps_serving(served, client):
    url = served[0]
    post = lambda body, path="/chat/completions": httpx.post(url + path, content=body, timeout=60)  # noqa: E731
    ok = {"model": "smollm2", "messages": DIALOG, "max_tokens": 2}
    cases = {
        "malformed": b'{"messages": [',
        "not an object": b"[1, 2]",
        "wrong type": json.dumps({**ok, "temperature": "hot"}).encode(),
        "max_tokens type": json.dumps({**ok, "max_tokens": "10"}).encode(),
        "oversize max_tokens": json.dumps({**ok, "max_tokens": 10**9}).encode(),
        "no messages": json.dumps({"model": "smollm2"}).encode(),
        "bad role": json.dumps({**ok, "messages": [{"role": "robot", "content": "hi"}]}).encode(),
        "n": json.dumps({**ok, "n": 3}).encode(),
        "tools on ChatML": json.dumps({**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(),
        "prompt too long": json.dumps({**ok, "messages": [{"role": "user", "content": "word " * 5000}]}).encode(),
    }
    for name, body in cases.items():
        r = post(body)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error", name
    assert post(b'{"prompt": 5}', "/completions").status_code == 400
    assert httpx.get(url + "/nowhere").status_code == 404
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="smollm2", messages=DIALOG, temperature=-1)
    r = client.chat.completions.create(model="smollm2", messages=DIALOG, max_tokens=3)  # still serving
    assert r.usage.completion_tokens >= 1 and client.models.list().data[0].id == "smollm2"


# ---------------------------------------------------------------------------- tool calls, python -m llama.serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, llama3_tokenizer_path):
    """`python -m llama.serve` over a scripted Llama-3-vocab model that answers every prompt with
    <|python_tag|>brave_search.call(query="gold price")<|eom_id|> (tests/helpers.scripted_checkpoint)."""
    from llama.tokenizer import Tokenizer

    tok = Tokenizer(llama3_tokenizer_path)
    call = tok.encode('brave_search.call(query="gold price")', bos=False, eos=False)
    chain = [271, tok.special_tokens["<|python_tag|>"], *call, tok.eom_id]  # 271: "\n\n" ends every prompt
    ckpt = scripted_checkpoint(tmp_path_factory.mktemp("scripted"), llama3_tokenizer_path, chain)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama.serve", "--ckpt-dir", str(ckpt), "--port", str(port),
                             "--max-seq-len", "512", "--max-batch-size", "2", "--model-name", "scripted"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/models", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "the server did not come up"
        time.sleep(0.3)
    yield url, ckpt, chain
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
    assert proc.wait(timeout=60) == 0, proc.stdout.read()


SEARCH = {"type": "function", "function": {"name": "brave_search", "description": "web search",
                                           "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "the city"}}, "required": ["city"]}}}


@pytest.mark.slow  # starts a server process (~10-30 s on a busy machine)
def test_tool_call_round_trip_through_the_cli(tool_server):
    from llama.tokenizer import load_tokenizer

    url, ckpt, chain = tool_server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "What does gold cost today?"}]
    r = client.chat.completions.create(model="scripted", messages=messages, tools=[SEARCH, WEATHER], temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "brave_search" and json.loads(call.function.arguments) == {"query": "gold price"}
    assert choice.model_extra["token_ids"] == chain[1:-1]  # the <|eom_id|> ended it
    chunks = list(client.chat.completions.create(model="scripted", messages=messages, tools=[SEARCH], stream=True,
                                                 temperature=0))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""  # the call is never shown as text
    (streamed,) = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert streamed.function.name == "brave_search" and chunks[-1].choices[0].finish_reason == "tool_calls"
    # the round trip: the call and its result go back; the prompt is exactly the library's encoding
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"price": "2650 USD/oz"}'}]
    again = client.chat.completions.create(model="scripted", messages=history, tools=[SEARCH, WEATHER], temperature=0)
    fmt = load_tokenizer(ckpt).chat_format
    expected = fmt.encode_dialog_prompt(history, tools=[SEARCH, WEATHER])
    assert again.usage.prompt_tokens == len(expected)
    tag, eom = chain[1], chain[-1]
    assert expected.count(tag) == 1 and eom in expected  # the earlier call re-encoded as the model wrote it
    with pytest.raises(openai.BadRequestError, match="required"):
        client.chat.completions.create(model="scripted", messages=messages, tools=[SEARCH], tool_choice="required")
    none = client.chat.completions.create(model="scripted", messages=messages, tools=[SEARCH], tool_choice="none")
    assert none.usage.prompt_tokens == len(fmt.encode_dialog_prompt(messages))


def test_serve_cli_refuses_bad_flags_in_one_line():
    from llama.serve.__main__ import main
    from tests.helpers import run_main

    for flags, words in [(["--port", "70000"], "--port 70000: use 1-65535"), (["--quantize", "int3"], "int3"),
                         (["--max-seq-len", "1"], "--max-seq-len 1"), (["--max-batch-size", "0"], "--max-batch-size 0")]:
        out = run_main(main, *flags)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, (flags, out.stderr)
        assert out.stderr.startswith("error: ") and words in out.stderr, (flags, out.stderr)


# ---------------------------------------------------------------------------- the engine under model parallelism


def _engine_rank(ckpt, prompts):
    """One rank: the Engine over a model split in 2; rank 0 submits the requests and collects ids."""
    from llama.generation import Llama
    from llama.serve.engine import Request

    llama = Llama.build(ckpt, max_seq_len=64, max_batch_size=2, model_parallel_size=2, device="cpu")
    engine = Engine(llama)
    ids = [[] for _ in prompts]
    if engine.rank0:
        for i, p in enumerate(prompts + prompts[:1]):  # 3 requests on 2 slots: one waits for a free slot
            engine.submit(Request(p, 8, temperature=0, emit=lambda e, i=i: ids[i % len(prompts)].append(e.id)
                                  if i < len(prompts) else None))
        engine.stop()
    engine.run()
    return ids


@pytest.mark.slow  # two gloo processes
def test_engine_under_model_parallel_matches_one_process(tiny_dir, llama3_tokenizer_path):
    from llama.generation import Llama
    from llama.tokenizer import load_tokenizer
    from tests.helpers import run_distributed

    tok = load_tokenizer(llama3_tokenizer_path)
    prompts = [tok.encode(t, bos=True, eos=False) for t in ("Hello there", "The capital of France is a city")]
    ranks = run_distributed(_engine_rank, 2, tiny_dir, prompts)
    reference, _ = Llama.build(tiny_dir, max_seq_len=64, max_batch_size=2, device="cpu").generate(
        prompts, 8, temperature=0)
    stop = set(tok.stop_tokens)
    assert [[t for t in ids if t not in stop] for ids in ranks[0]] == reference
