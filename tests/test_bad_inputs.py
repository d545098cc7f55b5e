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


def write_bad_tokens_gguf(path: Path) -> Path:
    """A GGUF declaring a byte-level BPE ("gpt2") tokenizer whose token list is 50 made-up tokens for a
    128-row embedding: its tokenizer cannot work."""
    import gguf

    from tests.helpers import tiny_model, write_gguf

    model, args = tiny_model()
    add_token_list = gguf.GGUFWriter.add_token_list

    def inconsistent(self, tokens):
        add_token_list(self, tokens[:50])
        self.add_tokenizer_model("gpt2")
        self.add_token_merges(["t o", "to k"])

    with pytest.MonkeyPatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_token_list", inconsistent)
        return write_gguf(path, model.state_dict(), args)


def small_checkpoint(out: Path, tokenizer: Path) -> Path:
    """A tiny Meta checkpoint with the tiny corpus's 640-token BPE (a tiktoken file with Meta's
    specials, so Llama 3's chat format): it loads in milliseconds."""
    from tests.helpers import tiny_checkpoint

    out.mkdir(parents=True)
    return tiny_checkpoint(out, tokenizer, vocab_size=640)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, corpus):
    """A user's folder: a checkpoint (some rows try to destroy it), an adapter and a LoRA run folder,
    text, choice items, chats, and files of the wrong kind."""
    root = tmp_path_factory.mktemp("user")
    small_checkpoint(root / "ckpt", corpus[1])
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
    shutil.copy(root / "ckpt/tokenizer.model", root / "tok.model")
    (root / "a_dir").mkdir()
    (root / "zero").mkdir()
    for f in (root / "ckpt").iterdir():
        (root / "zero" / f.name).symlink_to(f)
    (root / "zero/consolidated.00.pth").unlink()
    (root / "zero/consolidated.00.pth").write_bytes(b"")
    write_bad_tokens_gguf(root / "bad_tokens.gguf")
    from llama.tokenizer import train_bpe

    train_bpe([str(root / "notes.txt")], 600, root / "other.model")  # another tokenizer, smaller than the model's
    (root / "brace.txt").write_text("{my notes, not a tokenizer}\n")
    from tests.helpers import tiny_model

    model, args = tiny_model()
    checkpoint.save_meta(model.state_dict(), args, root / "half", num_shards=2)
    (root / "half/consolidated.01.pth").unlink()
    shutil.copy(root / "tok.model", root / "half/tokenizer.model")
    pristine = tmp_path_factory.mktemp("pristine") / "user"
    shutil.copytree(root, pristine, symlinks=True)
    return SimpleNamespace(root=root, data=corpus[0], bpe=corpus[1], pristine=pristine)


@pytest.fixture
def w(ws):
    """The workspace, put back as it was after a case that changed it (so one failure stays one)."""
    yield ws
    pristine = ws.pristine
    if {k: v[:2] for k, v in tree(ws.root).items()} != {k: v[:2] for k, v in tree(pristine).items()}:
        shutil.rmtree(ws.root)
        shutil.copytree(pristine, ws.root, symlinks=True)


# A CUDA device this machine does not have: cuda:0 here (no GPU), cuda:N on a machine with N GPUs.
NO_GPU = f"cuda:{torch.cuda.device_count()}"
CUDA = "cuda" if not torch.cuda.is_available() else NO_GPU


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
     lambda w: ["choice", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "items.jsonl", "--device", CUDA],
     ["--device", CUDA]),
    ("perplexity-device-cuda0", "devices", "eval",
     lambda w: ["perplexity", "--ckpt-dir", w.root / "ckpt", "--data", w.root / "notes.txt", "--device", NO_GPU],
     ["--device", NO_GPU]),
    ("compare-device-foo", "devices", "eval", lambda w: ["compare", w.root / "ckpt", "--device", "foo"],
     ["--device", "foo"]),
    ("generate-device-cuda0", "devices", "generate",
     lambda w: ["--ckpt-dir", w.root / "ckpt", "--prompt", "Hi", "--device", NO_GPU], ["--device", NO_GPU]),
    ("train-device-cuda1", "devices", "train", lambda w: train_args(w, f"device=cuda:{torch.cuda.device_count() + 1}"),
     ["device", f"cuda:{torch.cuda.device_count() + 1}"]),
    # ---- damaged checkpoints (before: IndexError inside the message) -------------------------------------
    ("generate-zero-byte-pth", "damaged files", "generate",
     lambda w: ["--ckpt-dir", w.root / "zero", "--prompt", "Hi"], ["consolidated.00.pth", "empty (0 bytes)"]),
    ("train-init-from-zero-byte", "damaged files", "train",
     lambda w: [*TINY_TRAIN[5:], "max_steps=1", f"init_from={w.root / 'zero'}", f"data={w.data}",
                f"out_dir={w.root / 'runs/zero'}"],
     ["consolidated.00.pth", "empty (0 bytes)"]),
    ("convert-zero-byte", "damaged files", "convert", lambda w: [w.root / "zero", w.root / "c1", "--to", "hf"],
     ["consolidated.00.pth", "empty (0 bytes)"]),
    # ---- unclear messages (before: a JSON parser's words, a shape mismatch) ------------------------------
    ("generate-tokenizer-is-text", "unclear", "generate",
     lambda w: ["--ckpt-dir", w.root / "ckpt", "--tokenizer-path", w.root / "brace.txt", "--prompt", "Hi"],
     ["brace.txt", "not a tokenizer"]),
    ("generate-missing-shard", "unclear", "generate", lambda w: ["--ckpt-dir", w.root / "half", "--prompt", "Hi"],
     ["half", "saved in 2 shards", "consolidated.00 .. 01.pth"]),
    # ---- data (before: traceback or silent) -------------------------------------------------------------
    ("convert-gguf-tokens-inconsistent", "data", "convert", lambda w: [w.root / "bad_tokens.gguf", w.root / "c2", "--to", "hf"],
     ["bad_tokens.gguf", "vocab"]),
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
     lambda w: [*TINY_TRAIN[5:], "max_steps=1", f"init_from={w.root / 'ckpt'}", f"tokenizer={w.root / 'other.model'}",
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


# ---------------------------------------------------------------------------- rules that hold everywhere


def test_every_number_in_the_training_config_has_a_range():
    """"Every numeric config value is range-checked once, where it is parsed": a new int or float key
    without an entry in RANGES fails here."""
    from llama.train.config import FIELDS
    from llama.train.limits import RANGES

    numeric = {name for name, f in FIELDS.items() if f.type in (int, float, "int", "float")}
    assert numeric - {"seed"} == set(RANGES)


CLI_MODULES = ["train.py", "generate.py", "llama/generation/cli.py", "llama/eval/cli.py", "llama/eval/commands.py",
               "llama/eval/compare.py", "llama/eval/lm_eval_adapter.py", "llama/checkpoint/convert.py",
               "llama/data/prepare.py", "llama/tokenizer/__init__.py", "llama/plan.py", "llama/serve/__main__.py",
               "llama/common/assets.py"]


# What a bug raises: an `except` naming one of these (or a bare one) must raise, never carry on.
PROGRAMMING_ERRORS = {"Exception", "BaseException", "TypeError", "AttributeError", "KeyError", "IndexError",
                      "LookupError", "NameError", "UnboundLocalError", "ValueError", "RuntimeError", "AssertionError",
                      "NotImplementedError", "ArithmeticError", "ZeroDivisionError", "RecursionError"}


def test_no_except_in_a_cli_swallows_a_programming_error():
    """An `except` in a command line's modules that catches what a bug raises (TypeError, KeyError,
    ValueError, Exception, a bare `except:` ...) raises: it re-raises, or turns a parse error of the
    user's input into a UserError naming it. It never carries on. User errors (UserError and its
    subclasses, USER_ERRORS), specific errors (UnicodeDecodeError, json.JSONDecodeError, OSError),
    Ctrl-C and a closed pipe may be handled. Read from the source."""
    import ast

    root = Path(__file__).resolve().parents[1]
    for rel in CLI_MODULES:
        for node in ast.walk(ast.parse((root / rel).read_text())):
            if not isinstance(node, ast.ExceptHandler):
                continue
            raises = any(isinstance(n, ast.Raise) for n in ast.walk(node))
            types = [] if node.type is None else node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            names = {ast.unparse(t).rsplit(".", 1)[-1] for t in types} or {"BaseException"}  # bare: everything
            assert raises or not names & PROGRAMMING_ERRORS, \
                f"{rel}:{node.lineno}: `except {', '.join(sorted(names))}` catches what a bug raises and goes on"

def test_sft_dialogs_longer_than_a_sequence_are_cut_or_dropped_and_counted(ws, tmp_path):
    """An SFT dialog longer than seq_len + 1 tokens keeps its start; one left without an assistant
    token is dropped (it trained on nothing: loss 0, no gradient). The log gives both counts, and
    every training sequence has something to learn."""
    from llama.data.prepare import encode_dialog
    from llama.tokenizer import load_tokenizer
    from llama.train.batches import IGNORE, Batches

    long = "tell me about the weather in the mountains " * 12
    dialogs = ([[{"role": "user", "content": long}, {"role": "assistant", "content": "Sunny."}]] * 2  # dropped
               + [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long}]]  # cut, kept
               + [[{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}] for i in range(3)])
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    tok = load_tokenizer(ws.root / "tok.model")
    cut, dropped = 0, 0
    for d in dialogs:  # the rule, from the tokens themselves
        ids, mask = encode_dialog(tok, d)
        cut += len(ids) > 33
        dropped += not any(mask[1:33])
    assert (cut, dropped) == (3, 2)
    proc = run_main(train_script.main, *TINY_TRAIN[5:], "max_steps=1", f"init_from={ws.root / 'ckpt'}", "sft=true",
                    "batch_size=4", "val_fraction=0", f"data={chats}", f"out_dir={tmp_path / 'run'}",
                    f"data_cache={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr
    assert "3 of 6 (50.0%) cut, 2 (33.3%) dropped" in proc.stdout, proc.stdout
    data_dir = next((tmp_path / "cache").glob("sft-*"))
    batches = Batches(data_dir, 32, seed=1)
    assert len(batches) == 4
    for i in range(len(batches)):
        _, targets = batches.collate([batches._sequence(i, "train")])
        assert (targets != IGNORE).any()


def test_a_bug_in_eval_keeps_its_traceback(ws, monkeypatch):
    """The eval CLI catches user errors only (the other CLIs: tests/test_errors.py)."""
    from llama.eval import commands

    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(commands, "load", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        eval_cli.main(["perplexity", "--ckpt-dir", str(ws.root / "ckpt"), "--data", str(ws.root / "notes.txt")])


@pytest.mark.slow  # lm-eval indexes its ~15,000 task configs first (a minute here)
def test_harness_unknown_task_is_one_line(ws):
    proc = run_main(eval_cli.main, "harness", "--model", "llama-ref", "--model_args", f"ckpt_dir={ws.root / 'ckpt'}",
                    "--tasks", "no_such_task")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and errors == ["error: lm_eval: Tasks not found: no_such_task"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
