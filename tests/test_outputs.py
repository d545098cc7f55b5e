"""Every output of every command line follows llama/common/files.py's rule (issue 38): never an input
(data, tokenizer, adapter, checkpoint), never a folder holding one or inside one, never an existing
file without --overwrite, written atomically; a training run's out_dir holds one run, written by one
process at a time.

The output arguments are found in the parsers the commands build (argparse actions marked by
files.add_output_argument; train.py's are config keys), and each is tried against each input of a
command that uses it. The eleven data-loss cases of issue 38 each have a test here or a row in
tests/test_bad_inputs.py; each failed before."""

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train as train_script
from llama import plan, tokenizer
from llama.checkpoint import convert
from llama.common import files
from llama.data import prepare as data
from llama.eval import cli as eval_cli
from llama.generation import cli as generate_cli
from llama.serve.__main__ import main as serve_main
from llama.train import limits as train_config
from llama.train.state import is_training_checkpoint
from tests.helpers import TINY_TRAIN, ROOT, run_main
from tests.test_bad_inputs import make_adapter, small_checkpoint, tree

CLIS = {"generate": (generate_cli.main, []), "eval": (eval_cli.main, ["perplexity"]), "convert": (convert.main, ["a", "b"]),
        "data": (data.main, ["prepare", "x", "--out", "y"]), "tokenizer": (tokenizer.main, ["encode", "--tokenizer", "t", "x"]),
        "plan": (plan.main, []), "serve": (serve_main, [])}
# Names an output argument would have: the safety net for one added without add_output_argument.
OUTPUT_NAMES = {"out", "json", "dst", "output", "output_path", "out_dir", "save", "save_dir"}


class _Parsed(Exception):
    pass


def parser_of(main, argv, monkeypatch) -> argparse.ArgumentParser:
    """The parser main() builds, caught as it parses."""
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", catch)
        with pytest.raises(_Parsed):
            main(argv)
    return caught[0]


def actions(parser, command=()):
    """(subcommand path, action) for every argument of the parser and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from actions(sub, command + (name,))
        else:
            yield command, action


def output_arguments(monkeypatch) -> dict:
    """{(cli, subcommand...): [flag or positional name]} of every marked output argument."""
    found = {}
    for cli, (main, argv) in CLIS.items():
        for command, action in actions(parser_of(main, argv, monkeypatch)):
            name = action.option_strings[0] if action.option_strings else action.dest
            if action.dest in OUTPUT_NAMES:
                assert getattr(action, "output", None), f"{cli} {command} {name}: an output not marked by add_output_argument"
            if getattr(action, "output", None):
                found.setdefault((cli, *command), []).append(name)
    return found


@pytest.fixture(scope="module")
def ws(tmp_path_factory, corpus):
    """Every kind of input: a checkpoint, an adapter, a tokenizer, texts, items, prompts, a corpus folder."""
    root = tmp_path_factory.mktemp("inputs")
    small_checkpoint(root / "ckpt", corpus[1])
    make_adapter(root / "ckpt", root / "adapter")
    shutil.copy(root / "ckpt/tokenizer.model", root / "tok.model")
    (root / "notes.txt").write_text("In the beginning God created the heaven and the earth. " * 8)
    (root / "prompts.txt").write_text("The capital of France is\n")
    (root / "items.jsonl").write_text(json.dumps({"context": "1 + 1 =", "choices": ["2", "3"], "label": 0}) + "\n")
    (root / "pairs.jsonl").write_text(json.dumps({"prompt": "1 + 1 =", "chosen": "2", "rejected": "3"}) + "\n")
    (root / "corpus").mkdir()
    (root / "corpus/a.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    (root / "tasks").mkdir()
    (root / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                  "multiple_of": 32, "vocab_size": 640}))
    return root


# The command each output is tried in: "{out}" is where the output goes; every other "{name}" is an
# input (a file or folder of `ws`). --overwrite where the command has it, so that only the input
# rule can refuse.
BASE = {
    ("eval", "perplexity"): ["perplexity", "--ckpt-dir", "{ckpt}", "--lora", "{adapter}", "--tokenizer-path", "{tok.model}",
                             "--data", "{notes.txt}", "--max-length", "16", "--json", "{out}", "--overwrite"],
    ("eval", "choice"): ["choice", "--ckpt-dir", "{ckpt}", "--lora", "{adapter}", "--tokenizer-path", "{tok.model}",
                         "--data", "{items.jsonl}", "--out", "{out}", "--overwrite"],
    ("eval", "pairs"): ["pairs", "--ckpt-dir", "{ckpt}", "--lora", "{adapter}", "--tokenizer-path", "{tok.model}",
                        "--data", "{pairs.jsonl}", "--out", "{out}", "--overwrite"],
    ("eval", "compare"): ["compare", "{ckpt}", "--prompts", "{prompts.txt}", "--data", "{notes.txt}", "--choices",
                          "{items.jsonl}", "--tokenizer-path", "{tok.model}", "--out", "{out}", "--overwrite"],
    ("convert",): ["{ckpt}", "{out}", "--to", "hf", "--lora", "{adapter}", "--overwrite"],
    ("data", "prepare"): ["prepare", "{corpus}", "{notes.txt}", "--tokenizer", "{tok.model}", "--out", "{out}",
                          "--overwrite"],
    ("tokenizer", "train"): ["train", "--input", "{corpus}", "{notes.txt}", "--vocab-size", "600", "--out", "{out}",
                             "--overwrite"],
}


def cases():
    out = []
    for key, argv in BASE.items():
        for name in [a.strip("{}") for a in argv if a.startswith("{") and a != "{out}"]:
            out.append((key, name))
    return out


def assert_refused(proc, root, before):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert any(w in errors[0] for w in ("input", "directory")), errors[0]
    assert tree(root) == before, "an input changed"


def test_every_output_argument_is_found_and_tried(monkeypatch):
    """The table above covers every output the parsers declare; generate.py, plan and serve write none."""
    found = output_arguments(monkeypatch)
    assert set(found) == set(BASE), found
    for key, names in found.items():
        for name in names:
            assert name in BASE[key] or name == "dst", (key, name)  # convert's positional DST is "{out}"
    assert set(train_config.OUTPUT_KEYS) == {"out_dir", "data_cache"}
    # `python -m llama.eval harness` hands its arguments to lm-eval's parser: its one output is
    # --output_path, which harness_main checks (test_harness_output_path_is_never_an_input)
    from lm_eval._cli.harness import HarnessCLI

    lm_eval_outputs = {a.dest for _, a in actions(HarnessCLI()._parser) if a.dest in OUTPUT_NAMES}
    assert lm_eval_outputs == {"output_path"}


@pytest.mark.parametrize("key,input_name", cases(), ids=[f"{'-'.join(k)}={n}" for k, n in cases()])
def test_an_output_is_never_an_input(key, input_name, ws):
    main = CLIS[key[0]][0]
    argv = [a.replace("{out}", "{" + input_name + "}") for a in BASE[key]]
    argv = [str(ws / a.strip("{}")) if a.startswith("{") else a for a in argv]
    before = tree(ws)
    assert_refused(run_main(main, *argv, cwd=ws), ws, before)


TRAIN_INPUTS = {"data": "corpus", "tokenizer": "tok.model", "init_from": "ckpt", "eval_data": "notes.txt",
                "model_config": "params.json"}


@pytest.mark.parametrize("output", ["out_dir", "data_cache"])
@pytest.mark.parametrize("input_key", sorted(TRAIN_INPUTS))
def test_a_training_output_is_never_an_input(output, input_key, ws):
    """train.py's outputs (config keys) against each of its inputs."""
    assert set(train_config.INPUT_KEYS) == set(TRAIN_INPUTS)
    paths = {k: ws / v for k, v in TRAIN_INPUTS.items()}
    shape = [f"model_config={paths['model_config']}"] if input_key == "model_config" else [f"init_from={paths['init_from']}"]
    argv = [*TINY_TRAIN[5:], *shape, f"data={paths['data']}", f"tokenizer={paths['tokenizer']}",
            f"eval_data={paths['eval_data']}", f"out_dir={ws / 'runs/a'}", f"data_cache={ws / 'cache'}",
            f"{output}={paths[input_key]}"]
    before = tree(ws)
    assert_refused(run_main(train_script.main, *argv, cwd=ws), ws, before)


def test_harness_output_path_is_never_an_input(ws):
    for inp in ("ckpt", "adapter", "tasks"):
        argv = ["harness", "--model", "llama-ref", "--model_args", f"ckpt_dir={ws / 'ckpt'},lora={ws / 'adapter'}",
                "--include_path", str(ws / "tasks"), "--tasks", "x", "--output_path", str(ws / inp / "results")]
        before = tree(ws)
        assert_refused(run_main(eval_cli.main, *argv, cwd=ws), ws, before)


# ---------------------------------------------------------------------------- the data-loss cases


def test_compare_never_replaces_a_report_without_overwrite(ws, tmp_path):
    """Issue 38: `compare ... --out .` replaced a report.md already in the folder."""
    (tmp_path / "report.md").write_text("my own report")
    (tmp_path / "keep.txt").write_text("mine")
    argv = ["compare", ws / "ckpt", "--max-gen-len", 1, "--out", "."]
    before = tree(tmp_path)
    proc = run_main(eval_cli.main, *argv, cwd=tmp_path)
    assert proc.returncode == 1 and "report.md already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert tree(tmp_path) == before
    proc = run_main(eval_cli.main, *argv, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "# Side-by-side" in (tmp_path / "report.md").read_text() and (tmp_path / "keep.txt").read_text() == "mine"


def test_choice_output_on_a_full_disk_keeps_the_old_file(ws, tmp_path):
    """Issue 38: on a full disk `eval choice --out` replaced the old scores with a truncated file. A
    file-size limit (RLIMIT_FSIZE) makes the write fail as a full disk does (EFBIG for ENOSPC)."""
    old = tmp_path / "scored.jsonl"
    old.write_text("the scores of last week\n" * 40)
    before = old.read_bytes()
    argv = ["choice", "--ckpt-dir", ws / "ckpt", "--data", ws / "items.jsonl", "--out", old, "--overwrite"]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an OSError (EFBIG) instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))  # every line of output is longer
    try:
        with pytest.raises(OSError) as e:  # a full disk is not the user's input: it keeps its traceback
            run_main(eval_cli.main, *argv, cwd=tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert e.value.errno == 27  # EFBIG
    assert old.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["scored.jsonl"]


def test_a_full_disk_during_the_optimizer_save_is_the_os_error(tmp_path):
    """DCP (the FSDP optimizer state) wraps a write failure in CheckpointException, a BaseException:
    it slipped past every `except Exception` (a test fixture's included, which then left its run
    half-done on a full CI disk). The save now raises the OSError itself."""
    import torch
    from torch.distributed import checkpoint as dcp

    from llama.train.fsdp import _dcp_call

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # the tensor's file needs 64 KB
    try:
        with pytest.raises(OSError) as e, _dcp_call():
            dcp.save({"optimizer": {"exp_avg": torch.ones(16384)}}, checkpoint_id=tmp_path / "optimizer.00",
                     no_dist=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert e.value.errno == 27  # EFBIG, as ENOSPC would be on a full disk


def test_a_json_output_may_go_to_a_new_folder(ws, tmp_path):
    """`--json missing/dir/x.json` was a traceback; the folders are made (as `mkdir -p` would)."""
    proc = run_main(eval_cli.main, "perplexity", "--ckpt-dir", ws / "ckpt", "--data", ws / "notes.txt",
                    "--max-length", 16, "--json", "new/dir/x.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "new/dir/x.json").read_text())["tokens"] > 0


def tiny_run(corpus, out, *extra, cwd=None):
    return run_main(train_script.main, *TINY_TRAIN, f"data={corpus[0]}", f"out_dir={out}", *extra, cwd=cwd)


def test_a_fresh_run_refuses_a_folder_holding_another_run(corpus, tmp_path):
    """Issue 38: a fresh, shorter run into an earlier run's out_dir pruned its own only checkpoint
    (keeping the older step_000004) and left `latest` naming a deleted folder; one of the same length
    overwrote the earlier checkpoints with a warning. Now: refused, unless overwrite=true, which
    deletes the earlier run's checkpoints (never a user's files) before this run saves."""
    out = tmp_path / "run"
    assert tiny_run(corpus, out, "max_steps=2", "save_every=1", "keep_last=1").returncode == 0
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    for steps in (1, 2):  # shorter, same length
        proc = tiny_run(corpus, out, f"max_steps={steps}", "keep_last=1")
        assert proc.returncode == 1 and "holds another run (latest = step_000002)" in proc.stderr, proc.stderr
        assert "resume=true" in proc.stderr and "overwrite=true" in proc.stderr
        assert tree(out) == before
    proc = tiny_run(corpus, out, "max_steps=1", "keep_last=1", "overwrite=true")
    assert proc.returncode == 0, proc.stderr
    assert (out / "latest").read_text() == "step_000001" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000001"]
    assert is_training_checkpoint(out / "step_000001")  # `latest` names a complete checkpoint
    proc = tiny_run(corpus, out, "max_steps=3", "resume=true", "overwrite=true")  # continue, or delete: not both
    assert proc.returncode == 1 and "drop one of them" in proc.stderr


HOLD = "import sys, time; from llama.common.files import lock_dir; lock_dir(sys.argv[1], 'x'); print('held', flush=True); time.sleep(120)"


def test_a_run_folder_is_written_by_one_process_at_a_time(corpus, tmp_path):
    """Issue 38: two runs into one out_dir shared `.step_N.tmp`; one died mid-save or both reported
    success with one run's checkpoints. Another process holds the folder: the run refuses, naming its
    pid, and writes nothing; once that process is gone (killed, not even releasing) the run goes."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in (), ("resume=true",):  # a resume is refused first too, before reading the holder's files
            proc = tiny_run(corpus, out, "max_steps=1", *extra)
            assert proc.returncode == 1 and f"being written by another process (pid {holder.pid})" in proc.stderr
        with pytest.raises(files.OutputError, match=f"pid {holder.pid}"):
            files.check_not_locked(out, "x")
        assert sorted(os.listdir(out)) == [files.LOCK]
    finally:
        holder.kill()
        holder.wait()
    files.check_not_locked(out, "x")  # the kernel dropped the killed holder's lock
    files.lock_dir(out, "x")
    files.unlock_dir(out)
    assert not (out / files.LOCK).exists()


def test_a_probe_never_takes_a_folder_from_its_writer(tmp_path):
    """check_not_locked holds a shared lock for an instant: two probes never refuse each other, and
    lock_dir waits one out instead of refusing the run."""
    import fcntl
    import threading

    (tmp_path / files.LOCK).write_text("")
    probe = os.open(tmp_path / files.LOCK, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe in progress
    files.check_not_locked(tmp_path, "x")  # another probe at the same time
    threading.Timer(0.1, os.close, [probe]).start()
    files.lock_dir(tmp_path, "x")  # waits the probe out
    files.unlock_dir(tmp_path)


@pytest.mark.slow  # two real training processes
def test_two_real_runs_into_one_folder(corpus, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), *TINY_TRAIN, f"data={corpus[0]}", f"out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    first = subprocess.Popen(args + ["max_steps=100000", "save_every=5"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        import time

        deadline = time.time() + 240
        while not (out / "latest").is_file():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = subprocess.run(args + ["max_steps=5", "resume=true"], capture_output=True, text=True, env=env,
                                cwd=ROOT, timeout=300)
        assert second.returncode == 1 and f"pid {first.pid}" in second.stderr, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
