"""llama/common/files.py and the commands that write directories: a user's files are never lost.

Every data-loss case asserts that each pre-existing file is byte-for-byte intact afterwards (a hash of
the whole tree before and after), that the command exits non-zero with one `error:` line naming the
fix and no traceback, and that no temporary is left behind."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama import checkpoint
from llama.common import files
from llama.common.files import OutputExistsError, atomic_dir, atomic_write, check_output_dir
from llama.checkpoint.convert import main as convert_main
from llama.data.prepare import main as data_main
from tests.helpers import run_main, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def tree(path) -> dict:
    """{relative path: sha256} of every file under `path` (and of `path` itself if it is a file)."""
    path = Path(path)
    found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


def temporaries(path) -> list:
    return sorted(str(p) for p in Path(path).rglob("*") if re.search(r"\.tmp|\.old\d|\.partial", p.name))


def run(*args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env,
                          timeout=timeout)


def assert_one_error_line(proc, *words):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


# ---------------------------------------------------------------------------- one writer


def test_only_files_py_renames_or_moves():
    """Every write goes through llama/common/files.py: no other module renames files into place or moves
    them, and only files.py (temporaries) and train/state.py (its own checkpoints) remove trees."""
    pattern = re.compile(r"os\.(replace|rename)\(|shutil\.move\(|\.rename\(|\.replace\(tmp")
    paths = sorted((ROOT / "llama").rglob("*.py"))  # every package of the layout, not only the top level
    assert len(paths) > 50
    for path in paths:
        text = path.read_text()
        if path.name != "files.py":
            assert not pattern.search(text), f"{path.name} renames files itself: use llama.common.files"
        if path.relative_to(ROOT / "llama").as_posix() not in ("common/files.py", "train/state.py"):
            assert "rmtree" not in text, f"{path.name} removes a directory tree: use llama.common.files"


def test_atomic_write_keeps_the_old_file_on_error_and_ctrl_c(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, lambda f: f.write(b"old"))
    for error in (RuntimeError("disk full"), KeyboardInterrupt()):
        def write(f, error=error):
            f.write(b"half of the new")
            raise error

        with pytest.raises(type(error)):
            atomic_write(target, write)
        assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["f.bin"]
    files.write_text(target, "new")
    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    before = tree(tmp_path)
    for error in (ValueError("bad input"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_dir(out, overwrite=True) as tmp:
                (tmp / "new.txt").write_text("partial")
                raise error
        assert tree(tmp_path) == before and temporaries(tmp_path) == []
    with pytest.raises(OutputExistsError, match="not empty.*--overwrite"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("done")
    assert sorted(os.listdir(out)) == ["new.txt"] and temporaries(tmp_path) == []
    with atomic_dir(tmp_path / "fresh" / "deeper") as tmp:  # parents are created; an empty dir is fine
        (tmp / "a").write_text("a")
    assert (tmp_path / "fresh/deeper/a").read_text() == "a"


def test_overwrite_never_removes_inputs_cwd_or_their_parents(tmp_path, monkeypatch):
    corpus = tmp_path / "project" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text("text")
    monkeypatch.chdir(corpus)
    for out, inputs in [(corpus, [corpus]), (tmp_path / "project", [corpus]), (tmp_path, [corpus / "a.txt"]),
                        (Path(".."), []), (Path("."), [])]:
        with pytest.raises(OutputExistsError, match="never replaces"):
            check_output_dir(out, overwrite=True, inputs=inputs)
    check_output_dir(tmp_path / "new", overwrite=False)


def test_stale_temporaries_are_removed_only_when_ours(tmp_path):
    ours = files.make_temp_dir(tmp_path / "x")
    theirs = tmp_path / ".y.tmp123"
    theirs.mkdir()
    (theirs / "data").write_text("a user's")
    files.remove_stale_temps(tmp_path)
    assert not ours.exists() and (theirs / "data").read_text() == "a user's"


# ---------------------------------------------------------------------------- data prepare


@pytest.fixture
def workspace(tmp_path, llama3_tokenizer_path):
    """A user's folder: a corpus, an earlier output with files in it, and an unrelated file."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus/a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "corpus/b.md").write_text("Another document, with words.")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/notes.txt").write_text("the user's notes")
    (tmp_path / "sibling.txt").write_text("next to everything")
    return tmp_path


def prepare_cli(*args, cwd, real=False):
    """`python -m llama.data prepare ARGS` in `cwd`: a real process, or its main() in this one."""
    if real:
        return run("-m", "llama.data", "prepare", *args, cwd=cwd)
    return run_main(data_main, "prepare", *args, cwd=cwd)


def convert_cli(*args, cwd, real=False):
    """`python -m llama.convert ARGS` in `cwd`: a real process, or its main() in this one."""
    if real:
        return run("-m", "llama.convert", *args, cwd=cwd)
    return run_main(convert_main, *args, cwd=cwd)


@pytest.mark.parametrize("case", ["existing-out", "out-is-input", "out-is-parent", "out-is-cwd", "bad-fraction",
                                  "missing-tokenizer"])
def test_prepare_refuses_and_keeps_every_file(workspace, case):
    ws = workspace
    args, cwd, words = {
        "existing-out": (["corpus", "--tokenizer", "llama3", "--out", "out"], ws, ["out", "--overwrite"]),
        "out-is-input": (["corpus", "--tokenizer", "llama3", "--out", "corpus", "--overwrite"], ws,
                         ["corpus", "input"]),
        "out-is-parent": (["a.txt", "--tokenizer", "llama3", "--out", "..", "--overwrite"], ws / "corpus",
                          ["current directory"]),
        "out-is-cwd": (["corpus", "--tokenizer", "llama3", "--out", ".", "--overwrite"], ws, ["current directory"]),
        "bad-fraction": (["corpus", "--tokenizer", "llama3", "--out", "new", "--val-fraction", "1.5"], ws,
                         ["val_fraction", "[0, 1)"]),
        "missing-tokenizer": (["corpus", "--tokenizer", "nope.model", "--out", "new"], ws,
                              ["--tokenizer nope.model does not exist", "llama3"]),
    }[case]
    before = tree(ws)
    proc = prepare_cli(*args, cwd=cwd, real=case == "existing-out")
    assert_one_error_line(proc, *words)
    assert tree(ws) == before and temporaries(ws) == []


def test_prepare_overwrite_tokenizer_names_and_checkpoint_dirs(workspace, llama3_tokenizer_path):
    ws = workspace
    proc = prepare_cli("corpus", "--tokenizer", "llama3", "--out", "out", "--overwrite", "--val-fraction", "0.5",
                       cwd=ws)
    assert proc.returncode == 0, proc.stderr
    assert "notes.txt" not in os.listdir(ws / "out") and (ws / "out/meta.json").is_file()
    # a checkpoint directory as --tokenizer, as train.py's tokenizer= accepts
    model, args = tiny_model(vocab_size=128256, dim=16, n_heads=2, n_kv_heads=1, hidden_dim=32, n_layers=1)
    checkpoint.save_meta(model.state_dict(), args, ws / "ckpt")
    (ws / "ckpt/tokenizer.model").write_bytes(llama3_tokenizer_path.read_bytes())
    proc = prepare_cli("corpus", "--tokenizer", "ckpt", "--out", "out2", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    from llama.data.prepare import read_meta

    assert read_meta(ws / "out")["n_tokens"] == read_meta(ws / "out2")["n_tokens"]
    assert temporaries(ws) == []


def interrupt_when(proc, appears, timeout=120):
    """Send SIGINT to `proc` once `appears()` is true (the command is writing its temporary)."""
    deadline = time.time() + timeout
    while not appears():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return err


def terminal_signals():
    """In the child before exec: SIGINT as a command started from a terminal has it (default, not
    blocked). An ignored or blocked SIGINT is inherited through exec, and something earlier in a full
    pytest session can leave this process so; the command would then never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def popen(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=terminal_signals)


@pytest.mark.slow
def test_prepare_ctrl_c_leaves_the_previous_output(workspace):
    ws = workspace
    before = tree(ws)
    # Training a BPE on this Python's standard library takes a while: interrupt it mid-way.
    proc = popen("-m", "llama.data", "prepare", "stdlib", "--vocab-size", "4096", "--out", "out", "--overwrite",
                 cwd=ws)
    err = interrupt_when(proc, lambda: any(p.name.startswith(".out.tmp") for p in ws.iterdir()))
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert tree(ws) == before and temporaries(ws) == []


# ---------------------------------------------------------------------------- convert


@pytest.fixture
def two_checkpoints(tmp_path):
    """A tiny Meta checkpoint, and an earlier run's checkpoint in the folder the user converts into."""
    model, args = tiny_model()
    checkpoint.save_meta(model.state_dict(), args, tmp_path / "src")
    other, other_args = tiny_model(seed=2)
    checkpoint.save_meta(other.state_dict(), other_args, tmp_path / "dst")
    torch.save({"step": 3}, tmp_path / "dst/train_state.00.pth")
    return tmp_path


def test_convert_refuses_an_existing_checkpoint_and_cleans_up_failures(two_checkpoints):
    ws = two_checkpoints
    before = tree(ws)
    assert_one_error_line(convert_cli("src", "dst", "--to", "hf", cwd=ws, real=True), "dst", "--overwrite")
    assert tree(ws) == before
    # a convert that fails half-way (3 shards do not divide the heads) leaves nothing behind
    assert_one_error_line(convert_cli("src", "new", "--to", "meta", "--shards", "3", cwd=ws), "shards")
    assert_one_error_line(convert_cli("src", "dst", "--to", "meta", "--shards", "3", "--overwrite", cwd=ws),
                          "shards")
    assert tree(ws) == before and temporaries(ws) == [] and not (ws / "new").exists()
    assert_one_error_line(convert_cli("src/..", ".", "--to", "meta", "--overwrite", cwd=ws / "src"),
                          "current directory")
    assert tree(ws) == before
    # --overwrite replaces the folder as a whole: no file of the earlier run stays mixed in
    assert convert_cli("src", "dst", "--to", "hf", "--overwrite", cwd=ws).returncode == 0
    assert sorted(os.listdir(ws / "dst")) == ["config.json", "model.safetensors"]
    assert temporaries(ws) == []


@pytest.mark.slow
def test_convert_ctrl_c_leaves_the_previous_output(two_checkpoints, smollm2_gguf):
    ws = two_checkpoints
    before = tree(ws)
    proc = popen("-m", "llama.convert", str(smollm2_gguf), "dst", "--to", "meta", "--overwrite", cwd=ws)
    err = interrupt_when(proc, lambda: any(p.name.startswith(".dst.tmp") for p in ws.iterdir()))
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert tree(ws) == before and temporaries(ws) == []


def test_a_lost_keyboard_interrupt_still_stops_the_commit(tmp_path, capsys):
    """Python loses a KeyboardInterrupt raised inside a weakref callback (import machinery has them):
    it prints "Exception ignored" and runs on. atomic_dir notes the SIGINT and refuses to commit, so
    the output is not replaced after the user pressed Ctrl-C, and nothing is printed for the loss."""
    import signal
    import weakref

    class Thing:
        pass

    final = tmp_path / "out"
    # SIGINT as a fresh command has it (handled, not blocked): in full runs something earlier in this
    # process left it otherwise (see terminal_signals), and atomic_dir rightly keeps an ignored one ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_dir(final) as tmp:
            (tmp / "half").write_text("x")
            thing = Thing()
            ref = weakref.ref(thing, lambda r: os.kill(os.getpid(), signal.SIGINT) or sum(range(100_000)))
            del thing  # the SIGINT's KeyboardInterrupt is raised, and lost, inside the callback
            assert ref() is None
    assert not final.exists() and list(tmp_path.iterdir()) == []
    assert "Exception ignored" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, previous)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
