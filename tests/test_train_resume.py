"""Resuming a run: bit-exact continuation, after SIGKILL mid-training or mid-save, with the saved
configuration; checkpoint saves that touch only their own directories."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import train as train_script
from tests.helpers import ROOT, TINY_TRAIN, read_metrics, tiny_train as train, train_until_killed


def test_resume_is_exact(corpus, tmp_path):
    data_dir, _ = corpus
    full = train(data_dir, tmp_path / "full", "max_steps=10", "save_every=5", "keep_last=0")
    # A crash between steps 5 and 10: only the step-5 checkpoint survives.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "step_000010")
    (crashed / "latest").write_text("step_000005")
    resumed = train(data_dir, crashed, "max_steps=10", "save_every=5", "keep_last=0", "resume=true")
    assert resumed["first_step"] == 5
    assert resumed["losses"] == full["losses"][5:]  # bit for bit on CPU
    a = torch.load(tmp_path / "full/step_000010/consolidated.00.pth", weights_only=True)
    b = torch.load(crashed / "step_000010/consolidated.00.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in read_metrics(crashed)] == list(range(1, 11))  # history rewritten, not doubled


def test_resume_reuses_the_saved_configuration(corpus, tmp_path, capsys):
    """`train.py out_dir=X resume=true` after a run started with other keys continues that run; keys
    given again must agree; a max_steps already reached, or another model_parallel_size, is one line.
    (train.py's main() in this process: the real command's exit path is test_train_config's.)"""
    data_dir, _ = corpus
    out = tmp_path / "run"
    train(data_dir, out, "max_steps=2", "save_every=2")
    capsys.readouterr()
    assert train_script.main([f"out_dir={out}", "resume=true", "max_steps=3", "log_every=1"]) == 0
    err = capsys.readouterr().err
    assert (out / "latest").read_text() == "step_000003" and "resumed from" in err
    cases = [
        (["max_steps=3"], "already at step 3 and max_steps=3"),
        ([], "already at step 3 and max_steps=3"),  # the saved max_steps: nothing left to do
        (["max_steps=5", "model.n_layers=3"], "model.n_layers=3 differs from model.n_layers=2"),
        (["max_steps=5", "seq_len=64"], "seq_len=64 differs from seq_len=32"),
        (["max_steps=5", "model_parallel_size=2"], "python -m llama.convert"),
    ]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for args, message in cases:
        code = train_script.main([f"out_dir={out}", "resume=true", *args])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # keys given again with the same values are fine
    again = train(data_dir, out, "max_steps=4", "save_every=2", "resume=true")
    assert again["first_step"] == 3


def test_checkpoint_saves_touch_only_their_own_directories(corpus, tmp_path):
    """Pruning and re-saving remove only step directories this code wrote; a user's folders named
    like them, or like a save's temporary, are kept."""
    data_dir, _ = corpus
    out = tmp_path / "run"
    (out / "step_000001").mkdir(parents=True)
    (out / "step_000001/mine.txt").write_text("a user's")
    (out / ".step_000009.tmp").mkdir()
    (out / ".step_000009.tmp/mine.txt").write_text("a user's too")
    train(data_dir, out, "max_steps=4", "save_every=2", "keep_last=1")
    assert (out / "step_000001/mine.txt").read_text() == "a user's"
    assert (out / ".step_000009.tmp/mine.txt").read_text() == "a user's too"
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000001", "step_000004"]


# ---------------------------------------------------------------------------- killed processes (slow)


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_last_complete_checkpoint(corpus, tmp_path):
    data_dir, _ = corpus
    out = tmp_path / "killed"
    base = TINY_TRAIN + [f"data={data_dir}", "decay_steps=40", "save_every=4"]  # schedule independent of max_steps
    saved = train_until_killed(base, out, 8)
    assert saved >= 8
    resumed = train(data_dir, out, "decay_steps=40", "save_every=4", f"max_steps={saved + 3}", "resume=true")
    reference = train(data_dir, tmp_path / "reference", "decay_steps=40", f"max_steps={saved + 3}")
    assert resumed["first_step"] == saved
    assert resumed["losses"] == reference["losses"][saved:]


KILL_DURING_SAVE = """
import os, runpy, signal, sys, torch
real_save, calls = torch.save, []
def save_then_die(obj, f, *args, **kwargs):
    calls.append(1)
    real_save(obj, f, *args, **kwargs)
    if len(calls) == 3:  # the second checkpoint's first file (its weights) is written: die now
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_during_save_leaves_the_previous_checkpoint(corpus, tmp_path):
    data_dir, _ = corpus
    out = tmp_path / "run"
    args = TINY_TRAIN + [f"data={data_dir}", f"out_dir={out}", "max_steps=6", "save_every=3"]
    done = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(ROOT / "train.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert (out / "latest").read_text() == "step_000003"
    assert (out / ".step_000006.tmp").is_dir() and not (out / "step_000006").exists()
    from llama.checkpoint import load_model

    load_model(out / "step_000003", max_seq_len=32)  # the previous checkpoint is complete
    resumed = train(data_dir, out, "max_steps=6", "save_every=3", "resume=true")
    assert resumed["first_step"] == 3 and len(resumed["losses"]) == 3
    assert (out / "latest").read_text() == "step_000006" and not (out / ".step_000006.tmp").exists()
