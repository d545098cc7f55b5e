"""Shared pieces of the training tests: a tiny prepared corpus, tiny configs, and the functions that
tests/dist.py runs in each spawned process (they must live in an importable module)."""

import json
import os
import sys
from pathlib import Path

import torch

from llama.train.data import bpe_dataset, stdlib_files
from llama.train.config import load_config

ROOT = Path(__file__).resolve().parent.parent

# A real corpus in miniature: 12 stdlib modules, a 640-token BPE trained on them.
CORPUS_FILES = ["abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "functools.py", "glob.py",
                "heapq.py", "keyword.py", "shlex.py", "string.py", "textwrap.py"]

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=32",
        "seq_len=32", "batch_size=8", "micro_batch_size=4", "warmup_steps=2", "lr=3e-3", "min_lr=3e-4",
        "log_every=1", "eval_every=0", "save_every=0", "grad_clip=0.5"]


def tiny_corpus(root: Path):
    """(prepared data dir, tokenizer) for the miniature corpus, built once under root."""
    files = {f.name: f for f in stdlib_files()}
    src = root / "src"
    if not src.is_dir():
        src.mkdir(parents=True)
        for name in CORPUS_FILES:
            (src / name).write_text(files[name].read_text())
    return bpe_dataset([str(src)], root / "cache", 640, 0.1)


def tiny_config(data_dir, out_dir, *extra):
    return load_config(None, TINY + [f"data={data_dir}", f"out_dir={out_dir}", *extra])


def train_worker(data_dir, out_dir, overrides):
    """One rank of a training run: returns (losses, grad norms from metrics.jsonl on rank 0)."""
    from llama.train.setup import train

    result = train(tiny_config(data_dir, out_dir, *overrides))
    return result


def read_metrics(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*args, env=None, timeout=300):
    """Run train.py in a fresh interpreter; returns the CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
