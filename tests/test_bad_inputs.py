"""Issue 38's survey as a table: every case it found (data loss, silent acceptance, traceback) run
through the real command lines, in this process (llama.common.errors' contract: status 1, one
`error:` line naming the offending value, no traceback, nothing written).

Each row: (id, family, command line, arguments, words the error line must contain). The family is
the one in docs/reliability.md's table; `before` in a row's id comment says what the case did before
issue 38 (`loss`: a user's file destroyed, `silent`: ran on and produced a wrong or empty result,
`traceback`). The data-loss rows also hash the workspace before and after."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train as train_script
from llama import checkpoint, lora, plan, tokenizer
from llama.checkpoint import convert, peft as peft_io
from llama.data import prepare as data
from llama.eval import cli as eval_cli
from llama.generation import cli as generate_cli
from tests.helpers import TINY_TRAIN, run_main

CLIS = {"generate": generate_cli.main, "train": train_script.main, "eval": eval_cli.main, "convert": convert.main,
        "data": data.main, "tokenizer": tokenizer.main, "plan": plan.main}


def tree(root: Path) -> dict:
    """{relative path: (size, mtime, inode)} of every file under root: what a case must leave as it
    was (any write, a rename into place included, changes one of them)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def make_adapter(ckpt: Path, out: Path) -> Path:
    """A PEFT adapter (r=4, random B) for the tiny checkpoint, as a LoRA run would export it."""
    model = checkpoint.load_model(ckpt)
    lora.add_lora(model, 4, 8.0, seed=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    peft_io.save_peft(out, peft_io.export_training_adapter(lora.adapter_state(model)), model.params, 4, 8.0, 0.0,
                      model.lora["targets"], {"path": str(ckpt), "params_sha256": peft_io.params_sha256(model.params)})
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_dir, corpus):
    """A user's folder: a checkpoint (a copy: some rows try to destroy it), an adapter and a LoRA run
    folder, text, choice items, chats, and files of the wrong kind."""
    root = tmp_path_factory.mktemp("user")
    shutil.copytree(tiny_dir, root / "ckpt")
    make_adapter(root / "ckpt", root / "adapter")
    shutil.copytree(root / "adapter", root / "run/step_000004")
    (root / "run/latest").write_text("step_000004")
    (root / "notes.txt").write_text("In the beginning God created the heaven and the earth. " * 8)
    (root / "corpus.txt").write_text("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 30)
    (root / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9. ".encode("latin-1") * 10)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "empty.txt").write_text("")
    items = [{"context": f"{a} plus {a} is", "choices": [str(2 * a), str(2 * a + 1)], "label": 0} for a in (1, 2, 3)]
    (root / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (root / "latin1.jsonl").write_bytes(json.dumps(items[0]).replace("plus", "pl\u00fcs").encode("latin-1") + b"\n")
    (root / "numbers.jsonl").write_text('{"text": 42}\n')
    long_user = "tell me about the weather in the mountains " * 20
    chats = [{"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "Sunny."}]}] * 4
    (root / "long_chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    robot = {"messages": [{"role": "robot", "content": "Beep."}, {"role": "assistant", "content": "Hi."}]}
    (root / "robot.jsonl").write_text(json.dumps(robot) + "\n")
    shutil.copy(tiny_dir / "tokenizer.model", root / "tok.model")
    (root / "a_dir").mkdir()
    (root / "zero").mkdir()
    for f in (root / "ckpt").iterdir():
        (root / "zero" / f.name).symlink_to(f)
    (root / "zero/consolidated.00.pth").unlink()
    (root / "zero/consolidated.00.pth").write_bytes(b"")
    shutil.copytree(root, root.with_name(root.name + "-pristine"), symlinks=True)
    return SimpleNamespace(root=root, data=corpus[0], bpe=corpus[1])


@pytest.fixture
def w(ws):
    """The workspace, put back as it was after a case that changed it (so one failure stays one)."""
    yield ws
    pristine = ws.root.with_name(ws.root.name + "-pristine")
    if {k: v[0] for k, v in tree(ws.root).items()} != {k: v[0] for k, v in tree(pristine).items()}:
        shutil.rmtree(ws.root)
        shutil.copytree(pristine, ws.root, symlinks=True)


def train_args(w, *extra):
    return [*TINY_TRAIN, f"data={w.data}", f"out_dir={w.root / 'runs/new'}", f"data_cache={w.root / 'cache'}",
            "max_steps=1", *extra]


# (id, family, cli, args(w), words in the error line). Words name the offending value.
CASES = [
    # ---- outputs (before: loss) ---------------------------------------------------------------
    ("tokenizer-out-is-input", "outputs", "tokenizer",
     lambda w: ["train", "--input", w.root / "corpus.txt", "--vocab-size", 600, "--out", w.root / "corpus.txt"],
     ["corpus.txt", "input"]),
    ("tokenizer-out-exists", "outputs", "tokenizer",
     lambda w: ["train", "--input", w.root / "corpus.txt", "--vocab-size", 600, "--out", w.root / "tok.model"],
     ["tok.model", "--overwrite"]),
    ("perplexity-json-is-data", "outputs", "eval",
     lambda w: ["perplexity", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "notes.txt", "--max-length", 16,
                "--json", w.root / "notes.txt"], ["notes.txt", "input"]),
    ("choice-out-is-data", "outputs", "eval",
     lambda w: ["choice", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "items.jsonl", "--out",
                w.root / "items.jsonl"], ["items.jsonl", "input"]),
    ("convert-dst-is-lora", "outputs", "convert",
     lambda w: [w.root / "ckpt", w.root / "adapter", "--to", "hf", "--lora", w.root / "adapter", "--overwrite"],
     ["adapter", "input"]),
    ("convert-dst-holds-lora", "outputs", "convert",
     lambda w: [w.root / "ckpt", w.root / "run", "--to", "hf", "--lora", w.root / "run/step_000004", "--overwrite"],
     ["run", "input"]),
    # ---- outputs of the wrong kind (before: traceback) --------------------------------------------
    ("perplexity-json-is-dir", "outputs", "eval",
     lambda w: ["perplexity", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "notes.txt", "--max-length", 16,
                "--json", w.root / "a_dir"], ["a_dir", "directory"]),
    ("choice-out-is-dir", "outputs", "eval",
     lambda w: ["choice", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "items.jsonl", "--out", w.root / "a_dir"],
     ["a_dir", "directory"]),
    ("compare-out-is-file", "outputs", "eval",
     lambda w: ["compare", w.root / "ckpt", "--max-gen-len", 1, "--out", w.root / "notes.txt"],
     ["notes.txt", "not a directory"]),
    ("train-out-dir-is-file", "outputs", "train", lambda w: train_args(w, f"out_dir={w.root / 'notes.txt'}"),
     ["notes.txt", "not a directory"]),
    ("train-out-dir-empty", "outputs", "train", lambda w: train_args(w, 'out_dir=""'), ["out_dir", "empty"]),
    ("train-out-dir-is-data", "outputs", "train", lambda w: train_args(w, f"out_dir={w.data}"),
     ["out_dir", "input"]),
    ("tokenizer-out-empty", "outputs", "tokenizer",
     lambda w: ["train", "--input", w.root / "corpus.txt", "--vocab-size", 600, "--out", ""], ["--out", "empty"]),
    ("tokenizer-out-is-dir", "outputs", "tokenizer",
     lambda w: ["train", "--input", w.root / "corpus.txt", "--vocab-size", 600, "--out", w.root / "a_dir"],
     ["a_dir", "directory"]),
    # ---- input files of the wrong kind --------------------------------------------------------------
    ("plan-model-is-dir", "input files", "plan", lambda w: ["--model", w.root / "a_dir"], ["a_dir", "directory"]),
    ("train-config-is-binary", "input files", "train", lambda w: [w.root / "binary.bin"], ["binary.bin", "TOML"]),
    ("compare-prompts-binary", "input files", "eval",
     lambda w: ["compare", w.root / "ckpt", "--prompts", w.root / "binary.bin", "--out", w.root / "rep"],
     ["binary.bin", "binary"]),
    ("compare-prompts-latin1", "input files", "eval",
     lambda w: ["compare", w.root / "ckpt", "--prompts", w.root / "latin1.txt", "--out", w.root / "rep"],
     ["latin1.txt", "UTF-8"]),
    ("choice-data-binary", "input files", "eval",
     lambda w: ["choice", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "binary.bin"], ["binary.bin", "binary"]),
    ("choice-data-latin1", "input files", "eval",
     lambda w: ["choice", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "latin1.jsonl"], ["latin1.jsonl", "UTF-8"]),
    # before: silent (bits/byte over more bytes than the file has)
    ("perplexity-binary", "input files", "eval",
     lambda w: ["perplexity", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "binary.bin", "--max-length", 16],
     ["binary.bin", "binary"]),
    ("perplexity-latin1", "input files", "eval",
     lambda w: ["perplexity", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "latin1.txt", "--max-length", 16],
     ["latin1.txt", "UTF-8"]),
    ("tokenizer-train-empty", "input files", "tokenizer",
     lambda w: ["train", "--input", w.root / "empty.txt", "--vocab-size", 600, "--out", w.root / "t1.model"],
     ["empty.txt", "no text"]),
    ("tokenizer-train-binary", "input files", "tokenizer",
     lambda w: ["train", "--input", w.root / "binary.bin", "--vocab-size", 600, "--out", w.root / "t2.model"],
     ["binary.bin", "binary"]),
    # ---- numbers (before: traceback or silent) ---------------------------------------------------------
    ("train-lr-nan", "numbers", "train", lambda w: train_args(w, "lr=nan"), ["lr", "nan"]),
    ("train-beta1", "numbers", "train", lambda w: train_args(w, "beta1=1.5"), ["beta1", "1.5"]),
    ("train-beta2", "numbers", "train", lambda w: train_args(w, "beta2=-0.1"), ["beta2", "-0.1"]),
    ("train-seed-negative", "numbers", "train", lambda w: train_args(w, "seed=-1"), ["seed", "-1"]),
    ("train-seed-huge", "numbers", "train", lambda w: train_args(w, f"seed={2**70}"), ["seed", str(2**70)]),
    ("train-min-lr-above-lr", "numbers", "train", lambda w: train_args(w, "lr=1e-4", "min_lr=1e-3"),
     ["min_lr", "lr"]),
    ("train-grad-clip-nan", "numbers", "train", lambda w: train_args(w, "grad_clip=nan"), ["grad_clip", "nan"]),
    ("train-weight-decay-inf", "numbers", "train", lambda w: train_args(w, "weight_decay=inf"), ["weight_decay", "inf"]),
    ("train-lora-alpha-nan", "numbers", "train", lambda w: train_args(w, "lora_rank=4", "lora_alpha=nan"),
     ["lora_alpha", "nan"]),
    ("generate-seed-huge", "numbers", "generate",
     lambda w: ["--ckpt-dir", w.root / "ckpt", "--prompt", "Hi", "--seed", "99999999999999999999999"],
     ["--seed", "99999999999999999999999"]),
    ("generate-temperature-inf", "numbers", "generate",
     lambda w: ["--ckpt-dir", w.root / "ckpt", "--prompt", "Hi", "--temperature", "inf"], ["temperature", "inf"]),
    ("generate-top-p-nan", "numbers", "generate",
     lambda w: ["--ckpt-dir", w.root / "ckpt", "--prompt", "Hi", "--top-p", "nan"], ["top_p", "nan"]),
    ("plan-mfu-nan", "numbers", "plan", lambda w: ["--model", "llama3.1-8b", "--mfu", "nan"], ["--mfu", "nan"]),
    ("plan-seq-zero", "numbers", "plan", lambda w: ["--model", "llama3.1-8b", "--seq", "0"], ["--seq", "0"]),
    ("convert-shards-zero", "numbers", "convert",
     lambda w: [w.root / "ckpt", w.root / "c0", "--to", "meta", "--shards", 0], ["--shards", "0"]),
    ("tokenizer-vocab-nan-size", "numbers", "tokenizer",
     lambda w: ["train", "--input", w.root / "corpus.txt", "--vocab-size", -5, "--out", w.root / "t3.model"],
     ["vocab", "-5"]),
    # ---- devices (before: traceback) -------------------------------------------------------------------
    ("perplexity-device-foo", "devices", "eval",
     lambda w: ["perplexity", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "notes.txt", "--device", "foo"],
     ["--device", "foo"]),
    ("choice-device-cuda", "devices", "eval",
     lambda w: ["choice", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "items.jsonl", "--device", "cuda"],
     ["--device", "cuda"]),
    ("perplexity-device-cuda0", "devices", "eval",
     lambda w: ["perplexity", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "notes.txt", "--device", "cuda:0"],
     ["--device", "cuda:0"]),
    ("compare-device-foo", "devices", "eval", lambda w: ["compare", w.root / "ckpt", "--device", "foo"],
     ["--device", "foo"]),
    ("generate-device-cuda0", "devices", "generate",
     lambda w: ["--ckpt-dir", w.root / "ckpt", "--prompt", "Hi", "--device", "cuda:0"], ["--device", "cuda:0"]),
    ("train-device-cuda1", "devices", "train", lambda w: train_args(w, "device=cuda:1"), ["device", "cuda:1"]),
    # ---- damaged checkpoints (before: IndexError inside the message) -------------------------------------
    ("generate-zero-byte-pth", "damaged files", "generate",
     lambda w: ["--ckpt-dir", w.root / "zero", "--prompt", "Hi"], ["consolidated.00.pth", "empty (0 bytes)"]),
    ("train-init-from-zero-byte", "damaged files", "train",
     lambda w: [*TINY_TRAIN[5:], "max_steps=1", f"init_from={w.root / 'zero'}", f"data={w.data}",
                f"out_dir={w.root / 'runs/zero'}"],
     ["consolidated.00.pth", "empty (0 bytes)"]),
    ("convert-zero-byte", "damaged files", "convert", lambda w: [w.root / "zero", w.root / "c1", "--to", "hf"],
     ["consolidated.00.pth", "empty (0 bytes)"]),
    # ---- data (before: traceback or silent) -------------------------------------------------------------
    ("prepare-text-is-number", "data", "data",
     lambda w: ["prepare", w.root / "numbers.jsonl", "--tokenizer", w.root / "tok.model", "--out", w.root / "d1"],
     ["numbers.jsonl:1", "text"]),
    ("train-text-is-number", "data", "train",
     lambda w: train_args(w, f"data={w.root / 'numbers.jsonl'}", f"tokenizer={w.root / 'tok.model'}"), ["numbers.jsonl:1", "text"]),
    ("prepare-role-robot", "data", "data",
     lambda w: ["prepare", w.root / "robot.jsonl", "--sft", "--tokenizer", w.root / "tok.model", "--out",
                w.root / "d2"], ["robot.jsonl:1", "robot"]),
    ("train-sft-nothing-fits", "data", "train",
     lambda w: [*TINY_TRAIN[5:], "max_steps=1", f"init_from={w.root / 'ckpt'}", "sft=true", "batch_size=4",
                f"data={w.root / 'long_chats.jsonl'}", f"out_dir={w.root / 'runs/sft'}", f"data_cache={w.root / 'cache'}"],
     ["long_chats.jsonl", "3 training dialogs", "seq_len=32"]),
    ("train-foreign-tokenizer", "data", "train",
     lambda w: [*TINY_TRAIN[5:], "max_steps=1", f"init_from={w.root / 'ckpt'}", f"tokenizer={w.bpe}",
                f"data={w.root / 'corpus.txt'}", f"out_dir={w.root / 'runs/tok'}", f"data_cache={w.root / 'cache'}"],
     ["tokenizer", "init_from"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_case_is_one_line_and_writes_nothing(case, w):
    name, family, cli, args, words = case
    ws = w
    before = tree(ws.root)
    proc = run_main(CLIS[cli], *args(ws), cwd=ws.root)
    err = proc.stderr
    assert proc.returncode not in (0, None), f"{name}: exit {proc.returncode}\n{err[-2000:]}"
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    after = tree(ws.root)
    cache = {k for k in after if k.startswith("cache/")}  # a tokenized-data cache may appear; nothing else
    assert {k: v for k, v in after.items() if k not in cache} == before, f"{name} changed the workspace"
