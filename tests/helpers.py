"""Shared by the tests: tiny models and checkpoints, multi-process launchers, tiny training runs."""

from pathlib import Path
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile

from gguf import GGMLQuantizationType as Q
import gguf
import numpy as np
import torch
import torch.multiprocessing as mp

from llama.common import assets
from llama.checkpoint import save_meta
from llama.common.files import atomic_dir
from llama.model import ModelArgs, Transformer
from llama.train.config import load_config
from llama.data.prepare import bpe_dataset, stdlib_files

# ---------------------------------------------------------------- HF transformers, the reference


def hf_from_gguf(path: Path) -> Path:
    """A folder with `model/` and `tokenizer/` as HF transformers converts the GGUF `path` (its fp32
    weights, its tokenizer files): the independent reference. Converting parses the file's metadata
    (SmolLM2's 49,152 tokens) and dequantizes every tensor, tens of seconds on two cores; so HF's result
    is kept under the user cache, keyed by the file and by the transformers and gguf versions that
    converted it, and later sessions load those exact tensors and files in about a second each."""
    from importlib.metadata import version

    import safetensors.torch
    import transformers

    stat = path.stat()
    key = f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers{transformers.__version__}-gguf{version('gguf')}"
    cached = assets.cache_dir() / "hf-from-gguf" / key
    if not cached.is_dir():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
        with atomic_dir(cached, overwrite=True) as tmp:  # another session may be writing it too
            tokenizer.save_pretrained(tmp / "tokenizer")
            vars(model.config).pop("quantization_config", None)  # the weights saved are HF's dequantized fp32
            model.config.save_pretrained(tmp / "model")
            safetensors.torch.save_model(model, str(tmp / "model" / "model.safetensors"))  # tied: saved once
    return cached


# ---------------------------------------------------------------- tiny models and checkpoints

# n_kv_heads=2 < 4 ranks: model parallel 4 duplicates K/V heads. vocab and FFN divisible by 4.
TINY_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96, rope_theta=10000.0,
                 max_seq_len=64)


def tiny_model(seed: int = 1, **overrides):
    args = ModelArgs(**{**TINY_ARGS, **overrides})
    model = Transformer(args)
    model.init_weights(seed)
    # norms at 1.0 would hide a norm loaded into the wrong place: make them distinct
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval(), args


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


def scripted_checkpoint(out_dir, tokenizer_path, chain, vocab_size=128256):
    """A real Llama-architecture checkpoint (Meta layout, the tokenizer beside it) whose greedy reply
    to any prompt ending in chain[0] is chain[1:]: with every block's output projections zero the
    residual stream is the last token's embedding, so the logits depend on that token alone. Token
    chain[i] embeds as basis vector i and output row chain[i+1] reads it (RMSNorm scales it to
    sqrt(dim)), so its logit is 10 * sqrt(dim) against 0 for every other token. Used where a test
    needs a model that calls a tool with Llama 3's real special tokens."""
    assert len(set(chain)) == len(chain) and len(chain) <= 33, "chain tokens must be distinct, at most 33"
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32,
                     rope_theta=10000.0)
    model = Transformer(args)
    model.init_weights(0)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.zero_()
        model.output.weight.zero_()
        for i, (a, b) in enumerate(zip(chain, chain[1:])):
            model.tok_embeddings.weight[a, i] = 1.0
            model.output.weight[b, i] = 10.0
    save_meta(model.state_dict(), args, out_dir)
    shutil.copy(tokenizer_path, out_dir / "tokenizer.model")
    return out_dir


def tokens(batch: int = 2, length: int = 20, vocab: int = 128, seed: int = 0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


_GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
               "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
               "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(meta: str) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if meta in top:
        return top[meta]
    _, i, rest = meta.split(".", 2)
    return f"blk.{i}.{_GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def write_gguf(path, state_dict, args: ModelArgs, qtype=Q.F32, arch: str = "llama", tokenizer_from=None,
               qtypes=None):
    """A llama.cpp-style GGUF of a Meta-key state dict; matrices stored as `qtype` (or as `qtypes` names
    them by Meta key: llama.cpp's Q4_0 files keep the output matrix at 8 bits), norms as F32. The
    tokenizer: every `tokenizer.*` key of the GGUF `tokenizer_from` (a real one: SmolLM2's 49,152
    tokens and ChatML template), else vocab_size placeholder tokens."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    if tokenizer_from is not None:
        _copy_tokenizer(w, tokenizer_from)
    else:
        w.add_token_list([f"tok{i}" for i in range(args.vocab_size)])
        w.add_token_types(np.ones(args.vocab_size, dtype=np.int32).tolist())
    for name, t in state_dict.items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        arr = t.detach().float().numpy()
        kind = (qtypes or {}).get(name, qtype)
        if arr.ndim == 2 and kind != Q.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, kind), raw_dtype=kind)
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _copy_tokenizer(writer, source) -> None:
    """Every tokenizer.* key of the GGUF file `source`, with its GGUF types."""
    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = gguf.GGUFValueType(field.types[0])
            sub = gguf.GGUFValueType(field.types[-1]) if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub)


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ranks start from a fork server that has imported torch and this module once, instead of each
# importing them afresh (spawn): seconds of CPU per rank, and the suite starts ~100 ranks. The
# server was started with the environment and directory of its first use, so each rank is given
# the caller's (a test's monkeypatched variables reach its ranks as they would under spawn).
_PRELOAD = ["torch", "torch.distributed", "fairscale.nn.model_parallel.initialize", "llama.model", "llama.parallel",
            "llama.generation", "tests.helpers"]


def _worker(rank, world_size, port, out_dir, fn, args, environ, cwd):
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    os.chdir(cwd)
    torch.set_num_threads(1)  # N processes share 2 cores; oversubscription makes gloo crawl
    try:
        result = fn(*args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_distributed(fn, world_size: int, *args, timeout: float = 900):
    """fn(*args) on `world_size` processes (forked from a server with torch imported); returns
    [result of rank 0, rank 1, ...]. Ranks still running after `timeout` seconds (a collective that
    some rank never reaches) are killed and the test fails, rather than hanging the suite."""
    import time

    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args, dict(os.environ),
                                                os.getcwd()), nprocs=world_size, join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} processes still ran after {timeout:.0f} s: "
                                   f"a rank waits in a collective the others never reach")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# ---------------------------------------------------------------- tiny training runs

ROOT = Path(__file__).resolve().parent.parent

# A real corpus in miniature: 12 stdlib modules, a 640-token BPE trained on them.
CORPUS_FILES = ["abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "functools.py", "glob.py",
                "heapq.py", "keyword.py", "shlex.py", "string.py", "textwrap.py"]

TINY_TRAIN = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=32",
        "seq_len=32", "batch_size=8", "micro_batch_size=4", "warmup_steps=2", "lr=3e-3", "min_lr=3e-4",
        "log_every=1", "eval_every=0", "save_every=0", "grad_clip=0.5"]


def corpus_files(root: Path) -> Path:
    """root/src holding the miniature corpus's 12 stdlib modules (written once)."""
    files = {f.name: f for f in stdlib_files()}
    src = root / "src"
    if not src.is_dir():
        src.mkdir(parents=True)
        for name in CORPUS_FILES:
            (src / name).write_text(files[name].read_text())
    return src


def tiny_corpus(root: Path):
    """(prepared data dir, tokenizer) for the miniature corpus, built once under root."""
    return bpe_dataset([str(corpus_files(root))], root / "cache", 640, 0.1)


def held_out_text(path: Path, chars: int = 3000) -> Path:
    """A text for eval_data that the corpus does not hold: the start of the stdlib's difflib.py."""
    import difflib

    assert Path(difflib.__file__).name not in CORPUS_FILES
    path.write_text(Path(difflib.__file__).read_text()[:chars])
    return path


def tiny_config(data_dir, out_dir, *extra):
    return load_config(None, TINY_TRAIN + [f"data={data_dir}", f"out_dir={out_dir}", *extra])


def tiny_train(data_dir, out_dir, *overrides) -> dict:
    """train.py's train() on the tiny config: the loss curves and the last checkpoint."""
    from train import train

    return train(tiny_config(data_dir, out_dir, *overrides))


def train_worker(data_dir, out_dir, overrides):
    """One rank of a training run (for run_distributed): train()'s result on this rank."""
    return tiny_train(data_dir, out_dir, *overrides)


def read_metrics(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*args, env=None, timeout=300):
    """Run train.py in a fresh interpreter; returns the CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def run_main(main, *args, cwd=None):
    """Call a command line's main(argv) in this process, in `cwd`, as its fresh interpreter would run
    it; returns a CompletedProcess (exit status, stdout, stderr). A new interpreter spends seconds
    importing torch, so each test file keeps one real process for the exit status and the absence of a
    traceback, and runs its other cases here; an unexpected exception here fails the test as a
    traceback there would."""
    import contextlib
    import io
    import subprocess

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's refusals and --help
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_until_killed(args, out_dir, step: int) -> int:
    """Run train.py in its own process with `args` (+ out_dir, no step limit), SIGKILL it once a
    checkpoint at `step` or later is complete, and return the step of the last complete checkpoint."""
    import signal
    import subprocess
    import time

    latest = Path(out_dir) / "latest"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"out_dir={out_dir}", "max_steps=100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.is_file() and latest.read_text() >= f"step_{step:06d}"):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return int(latest.read_text().split("_")[1])
