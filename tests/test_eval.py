"""Evaluation (llama/eval/) against independent references: HF transformers' strided-window loop and
log-softmax on the same SmolLM2 GGUF, one process vs model parallel, and the CLI's one-line errors
(lm-evaluation-harness's own runs: test_eval_harness.py)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.eval.perplexity import perplexity, strided_windows
from llama.tokenizer import encode_text

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt wind. "
        "Every night for forty years the keeper had climbed its narrow stairs to light the lamp, and every "
        "morning he had written a single line in the logbook: the weather, the ships he had seen, and "
        "whether the sea had been kind. When he retired, the town found the books stacked in his kitchen.")


@pytest.fixture(scope="module")
def smol(smollm2):
    """The session's SmolLM2 Transformer (conftest.py): the GGUF loaded once, fp32."""
    return smollm2.model


@pytest.fixture(scope="module")
def smol_tok(smollm2):
    return smollm2.tokenizer


def hf_strided_nll(hf_model, ids, max_length, stride):
    """HF's perplexity guide, verbatim in spirit: labels -100 before the window's new targets; the
    loss is a mean over the shifted labels that are not -100, so multiply back by their count."""
    ids = torch.tensor([ids])
    n, nll, count, prev_end = ids.shape[1], 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        valid = int((target_ids[:, 1:] != -100).sum())
        if valid:
            with torch.no_grad():
                loss = hf_model(input_ids, labels=target_ids).loss
            nll, count = nll + float(loss) * valid, count + valid
        prev_end = end
        if end == n:
            break
    return nll, count


def test_strided_windows_score_each_token_once():
    for n, L, s in [(100, 32, 8), (100, 32, 32), (33, 32, 31), (5, 32, 4), (64, 32, 1)]:
        windows = strided_windows(n, L, s)
        scored = [t for b, e, k in windows for t in range(e - k, e)]
        assert scored == sorted(set(scored))  # each once, in order
        assert all(e - b <= L and e - k >= b + 1 for b, e, k in windows)  # a target has context
        if s < L:
            assert scored == list(range(1, n))


@pytest.mark.parametrize("max_length,stride", [(48, 16), (48, 48), (128, 128)])
def test_perplexity_matches_hf_strided_loop(smol, smol_tok, hf_smollm2, hf_smollm2_tokenizer, max_length, stride):
    res = perplexity(smol, smol_tok, TEXT, max_length, stride, batch_size=3)
    ids = hf_smollm2_tokenizer(TEXT)["input_ids"]  # HF's tokenizer as it comes: SmolLM2's adds no BOS
    assert ids[0] != smol_tok.bos_id and ids == encode_text(smol_tok, TEXT)
    nll, count = hf_strided_nll(hf_smollm2, ids, max_length, stride)
    assert res.tokens == count and count > 60
    assert res.nll == pytest.approx(nll, rel=1e-4)
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-4)
    assert 1 < res.perplexity < 100  # a real model on real prose


def test_evaluation_takes_bos_from_the_tokenizers_own_rule(tiny_dir, smol_tok):
    """Llama 3's tokenizer adds BOS (so a text's first token is scored, given it); SmolLM2's adds none
    (its first token is context only). Prompts, perplexity and lm-eval contexts share the one rule."""
    from llama.eval.scoring import encode_pair
    from llama.generation import Llama

    llama3 = Llama.build(tiny_dir, max_seq_len=64, max_batch_size=1)
    tok = llama3.tokenizer
    ids = encode_text(tok, TEXT)
    assert ids[0] == tok.bos_id == 128000 and ids[1:] == tok.encode(TEXT, bos=False, eos=False)
    assert llama3.encode_prompt(TEXT) == ids
    assert perplexity(llama3.model, tok, TEXT, 32, 16).tokens == len(ids) - 1
    assert encode_pair(tok, "Paris is", " big")[0][0] == tok.bos_id
    smol_ids = encode_text(smol_tok, TEXT)
    assert smol_ids == smol_tok.encode(TEXT, bos=False, eos=False)
    assert encode_pair(smol_tok, "Paris is", " big")[0] == smol_tok.encode("Paris is", bos=False, eos=False)
    # lm-eval's empty context: the prefix token, unless the continuation starts with it
    assert encode_pair(smol_tok, "", " big") == ([smol_tok.bos_id], smol_tok.encode(" big", bos=False, eos=False))
    assert encode_pair(tok, "", "big")[0] == [tok.bos_id]


# ---------------------------------------------------------------------------- multiple choice

ITEMS = [
    {"context": "The capital of France is", "choices": ["Paris", "London", "a banana"], "label": 0},
    {"context": "Water freezes at zero degrees", "choices": ["Celsius", "Fahrenheit"], "label": 0},
    {"context": "def add(a, b):\n    return", "choices": ["a + b", "a * b", "print(a)", "None"], "label": 0},
    {"context": "In French, a coffee with milk is a", "choices": ["café au lait", "thé", "crème brûlée"], "label": 0},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_choice_matches_hf_log_softmax(smol, smol_tok, hf_smollm2, hf_smollm2_tokenizer, tmp_path):
    from llama.eval.choice import read_items, score_items, write_per_item

    items = read_items(write_jsonl(tmp_path / "items.jsonl", ITEMS))
    result = score_items(smol, smol_tok, items, batch_size=4)
    hf_tok = lambda s: hf_smollm2_tokenizer(s)["input_ids"]  # noqa: E731  as it comes, as lm-eval's hf model does
    correct = correct_norm = correct_bytes = 0
    for item, rec in zip(ITEMS, result["per_item"]):
        ctx = hf_tok(item["context"])
        expected = []
        for choice in item["choices"]:
            whole = hf_tok(item["context"] + " " + choice)
            with torch.no_grad():
                logp = torch.log_softmax(hf_smollm2(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            expected.append(sum(float(logp[p - 1, whole[p]]) for p in range(len(ctx), len(whole))))
        assert rec["logprobs"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
        per_byte = [e / len(c.encode()) for e, c in zip(expected, item["choices"])]
        per_char = [e / len(c) for e, c in zip(expected, item["choices"])]  # lm-eval's acc_norm
        correct += max(range(len(expected)), key=expected.__getitem__) == item["label"]
        correct_norm += max(range(len(per_char)), key=per_char.__getitem__) == item["label"]
        correct_bytes += max(range(len(per_byte)), key=per_byte.__getitem__) == item["label"]
    assert result["acc"] == correct / len(ITEMS) and result["acc_norm"] == correct_norm / len(ITEMS)
    assert result["acc_bytes"] == correct_bytes / len(ITEMS)
    assert result["acc"] >= 2 / 4  # SmolLM2 knows Paris and Celsius
    write_per_item(tmp_path / "scored.jsonl", items, result)
    lines = [json.loads(x) for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [x["logprobs"] for x in lines] == [r["logprobs"] for r in result["per_item"]]
    assert lines[0]["context"] == ITEMS[0]["context"] and "correct" in lines[0]


# ---------------------------------------------------------------------------- tiny checkpoints, CLI


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory, smollm2_gguf):
    """Two tiny random Llamas with SmolLM2's vocabulary (Meta layout) and its tokenizer: fast to run."""
    from llama import checkpoint
    from tests.helpers import tiny_model

    root = tmp_path_factory.mktemp("tiny")
    dirs = []
    for seed in (1, 2):
        model, args = tiny_model(seed, vocab_size=49152, max_seq_len=256)
        checkpoint.save_meta(model.state_dict(), args, root / f"model{seed}")
        dirs.append(str(root / f"model{seed}"))
    return dirs, str(smollm2_gguf)


def run_cli(argv, capsys):
    from llama.eval.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_report_equals_single_model_commands(tiny_ckpts, tmp_path, capsys):
    (a, b), tok = tiny_ckpts
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    items = write_jsonl(tmp_path / "items.jsonl", ITEMS)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    common = ["--tokenizer-path", tok, "--max-length", 32, "--stride", 16]
    single = []
    for ckpt in (a, b):
        json_path = tmp_path / f"p-{len(single)}.json"  # a new file each time: outputs are never overwritten silently
        code, out, _ = run_cli(["perplexity", "--ckpt-dir", ckpt, "--data", text, "--json", json_path, *common],
                               capsys)
        assert code == 0 and "perplexity" in out
        ppl = json.loads(json_path.read_text())
        code, out, _ = run_cli(["choice", "--ckpt-dir", ckpt, "--data", items, "--tokenizer-path", tok,
                                "--max-seq-len", 32], capsys)
        acc = float(next(line.split()[1] for line in out.splitlines() if line.startswith("acc ")))
        single.append((ppl, acc))
    code, out, _ = run_cli(["compare", a, b, "--prompts", prompts, "--data", text, "--choices", items,
                            "--max-gen-len", 4, "--out", tmp_path / "rep", "--no-general", *common], capsys)
    assert code == 0 and "report:" in out
    report = (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    rows = [line.split("|")[1:-1] for line in report.splitlines()
            if line.startswith("| ") and not line.startswith("| model |")]
    assert [r[0].strip() for r in rows] == ["model1", "model2"]
    for row, (ppl, acc) in zip(rows, single):
        assert float(row[1]) == pytest.approx(ppl["perplexity"], abs=1e-4)
        assert float(row[2]) == pytest.approx(ppl["bits_per_byte"], abs=1e-4)
        assert float(row[3]) == pytest.approx(acc, abs=1e-4)
    assert report.count("### Prompt") == 2


CHATS = [{"messages": [{"role": "user", "content": "What is the capital of Peru?"},
                       {"role": "assistant", "content": "The capital of Peru is Lima."}]},
         {"messages": [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."},
                       {"role": "user", "content": "And of grass?"}, {"role": "assistant", "content": "Green."}]}]


def test_chat_perplexity_matches_hf_chat_template(smol, smol_tok, hf_smollm2, hf_smollm2_tokenizer):
    """Each assistant reply (content + <|im_end|>) scored given the dialog before it, as HF's own chat
    template writes the dialog (SmolLM2's default system message included) and HF's model scores it."""
    from llama.eval.chat import chat_perplexity

    res = chat_perplexity(smol, smol_tok, [c["messages"] for c in CHATS], batch_size=2)
    nll, count = 0.0, 0
    for chat in CHATS:
        messages = chat["messages"]
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            ids = lambda text: hf_smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
            context = ids(hf_smollm2_tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False))
            whole = ids(hf_smollm2_tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))[:-1]  # less "\n"
            assert whole[: len(context)] == context and whole[-1] == hf_smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
            with torch.no_grad():
                logp = torch.log_softmax(hf_smollm2(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            nll -= sum(float(logp[p - 1, whole[p]]) for p in range(len(context), len(whole)))
            count += len(whole) - len(context)
    assert res.tokens == count and res.nll == pytest.approx(nll, rel=1e-4)
    assert res.bytes == sum(len(m["content"].encode()) for c in CHATS for m in c["messages"] if m["role"] == "assistant")


def test_which_checkpoints_are_chat_models(tiny_ckpts, tmp_path):
    """The rule of llama/eval/chat.py: a chat template in the tokenizer (SmolLM2's GGUF), an sft=true training
    checkpoint, a Meta dir named Instruct; a plain Meta dir is not one."""
    import shutil

    from llama.eval.chat import chat_reason

    (a, _), gguf = tiny_ckpts
    assert chat_reason("smollm2") == chat_reason(gguf) == "its tokenizer has a chat template"
    assert chat_reason(a) is None
    shutil.copytree(a, tmp_path / "Llama-3.1-8B-Instruct")
    assert chat_reason(tmp_path / "Llama-3.1-8B-Instruct") == "a Meta Instruct model"
    for sft in (True, False):
        run = tmp_path / f"run-{sft}"
        shutil.copytree(a, run / "step_000002")
        torch.save({"step": 2, "config": {"sft": sft}}, run / "step_000002" / "train_state.00.pth")
        (run / "latest").write_text("step_000002")
        assert chat_reason(run) == ("trained on chats (sft=true)" if sft else None)


def test_compare_a_lora_adapter_on_chats_with_the_general_check(tiny_ckpts, tmp_path, capsys):
    """--lora adds the first checkpoint with the adapter merged; a chat jsonl is scored as chats; the general
    check (on by default) scores the same items for every model; --limit caps each set; the numbers equal
    the single-model command's; the report says what changed and the chart is drawn."""
    from llama import lora
    from llama.checkpoint import load_model
    from llama.checkpoint.peft import params_sha256, save_peft

    (a, _), tok = tiny_ckpts
    model = load_model(a, max_seq_len=256)
    lora.add_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_peft(tmp_path / "adapter", lora.adapter_state(model), model.params, 2, 4.0, 0.0, lora.TARGETS,
              {"path": a, "params_sha256": params_sha256(model.params)})
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    common = ["--tokenizer-path", tok, "--max-length", 32, "--stride", 32]
    code, out, err = run_cli(["perplexity", "--ckpt-dir", a, "--lora", tmp_path / "adapter", "--data", chats,
                              "--json", tmp_path / "p.json", *common], capsys)
    assert code == 0, err
    single = json.loads((tmp_path / "p.json").read_text())
    code, out, err = run_cli(["compare", a, "--lora", tmp_path / "adapter", "--data", chats, "--limit", 2,
                              "--max-gen-len", 2, "--out", tmp_path / "rep", *common], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "rep" / "scores.json").read_text())
    base, tuned = report["models"]
    assert (base["lora"], tuned["lora"]) == (None, str(tmp_path / "adapter")) and report["chat"] is False
    assert tuned["scores"]["data"]["perplexity"] == pytest.approx(single["perplexity"], rel=1e-6)
    assert tuned["scores"]["data"]["perplexity"] != base["scores"]["data"]["perplexity"]
    assert base["scores"]["general-accuracy"]["items"] == tuned["scores"]["general-accuracy"]["items"] == 2
    assert base["scores"]["general-perplexity"]["tokens"] == tuned["scores"]["general-perplexity"]["tokens"] == 62
    assert (tmp_path / "rep" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "model1 + adapter" in (tmp_path / "rep" / "report.md").read_text()
    code, _, err = run_cli(["compare", a, "--out", tmp_path / "rep", "--no-general", *common], capsys)
    assert code == 1 and "--overwrite" in err  # an existing report is never replaced silently


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"), ("empty", "the file is empty"), ("no_choices", "items.jsonl:2: \"choices\""),
    ("bad_label", "items.jsonl:3: \"label\" 5 is out of range"), ("bad_json", "items.jsonl:1: not valid JSON"),
    ("stride_big", "--stride 64"), ("stride_zero", "--stride 0"), ("too_long", "exceeds the model's max_seq_len"),
    ("batch", "--batch-size 0"),
])
def test_bad_input_is_one_line(case, message, tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    good = json.dumps(ITEMS[0])
    lines = {"no_choices": [good, json.dumps({"context": "x", "label": 0})],
             "bad_label": [good, "", json.dumps({**ITEMS[1], "label": 5})], "bad_json": ["{oops"]}
    (tmp_path / "empty.txt").write_text("  \n")
    argv = {"missing": ["perplexity", "--data", tmp_path / "nope.txt"],
            "empty": ["perplexity", "--data", tmp_path / "empty.txt"],
            "stride_big": ["perplexity", "--max-length", 32, "--stride", 64],
            "stride_zero": ["perplexity", "--max-length", 32, "--stride", 0],
            "too_long": ["perplexity", "--max-length", 256, "--max-seq-len", 128],
            "batch": ["choice", "--batch-size", 0]}.get(case, ["choice", "--data", items])
    if case in lines:
        items.write_text("\n".join(lines[case]) + "\n")
    code, out, err = run_cli(argv, capsys)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_cli_exits_1_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llama.eval", "choice", "--data", tmp_path / "none.jsonl"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- model parallel


def mp_worker(ckpt: str, tok: str, mp: int):
    from llama.eval.choice import score_items
    from llama.generation import Llama

    llama = Llama.build(ckpt, tok, max_seq_len=64, max_batch_size=1, model_parallel_size=mp)
    ppl = perplexity(llama.model, llama.tokenizer, TEXT, 32, 16, batch_size=3)
    choice = score_items(llama.model, llama.tokenizer, ITEMS, batch_size=2)
    return ppl.nll, ppl.tokens, [r["logprobs"] for r in choice["per_item"]]


@pytest.mark.slow
def test_model_parallel_equals_one_process(tiny_ckpts):
    from tests.helpers import run_distributed

    (ckpt, _), tok = tiny_ckpts
    nll, tokens, logprobs = mp_worker(ckpt, tok, 1)
    for rank_nll, rank_tokens, rank_logprobs in run_distributed(mp_worker, 2, ckpt, tok, 2):
        assert rank_tokens == tokens
        assert rank_nll == pytest.approx(nll, rel=1e-5)
        for ours, ref in zip(rank_logprobs, logprobs):
            assert ours == pytest.approx(ref, rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------------------- training integration


def test_training_logs_eval_data_perplexity(tmp_path):
    from llama.generation import Llama
    from llama.train.config import ConfigError
    from train import train
    from tests.helpers import read_metrics, tiny_config, tiny_corpus

    data_dir, _ = tiny_corpus(tmp_path / "corpus")
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    with pytest.raises(ConfigError, match="eval_data .* is not a file"):
        tiny_config(data_dir, tmp_path / "run", f"eval_data={tmp_path / 'nope.txt'}")
    result = train(tiny_config(data_dir, tmp_path / "run", "max_steps=4", "eval_every=2", "eval_batches=1",
                               f"eval_data={text}"))
    evals = [m for m in read_metrics(tmp_path / "run") if "eval_ppl" in m]
    assert [m["step"] for m in evals] == [2, 4] and all("val_loss" in m for m in evals)
    llama = Llama.build(result["checkpoint"], max_seq_len=32, max_batch_size=1)  # the step-4 weights
    assert perplexity(llama.model, llama.tokenizer, TEXT, 32, 16).perplexity == pytest.approx(evals[-1]["eval_ppl"],
                                                                                             rel=1e-5)
