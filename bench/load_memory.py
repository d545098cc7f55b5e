"""Peak resident memory while loading a checkpoint, as a multiple of the loaded weights' size.

    flock /tmp/llama-bench.lock python bench/load_memory.py            # ~1.2 GB bf16 model
    python bench/load_memory.py --size-gb 0.15 --json                  # what the test runs
    python bench/load_memory.py --quantize int4 --formats hf meta-2-shards   # loading straight into int4

Writes one random bf16 model (dim 2048, 16 heads, 4 KV heads, FFN 5632, vocab 32000, as many layers
as --size-gb asks) as: Meta with 1 shard, Meta with 2 shards (merged to 1 at load), and HF. Each
measurement runs in a fresh process: it imports everything, resets the kernel's peak-RSS counter
(/proc/self/clear_refs), loads, then reads every page of the weights so that they are really in
memory, and reports (VmHWM - RSS before loading) / bytes of the model's parameters.

Peers, side by side: Meta's reference recipe (torch.load without mmap, then load_state_dict into a
model built with real tensors) and HF transformers' LlamaForCausalLM.from_pretrained.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama.checkpoint import save_hf, save_meta
from llama.model import ModelArgs, Transformer

SHAPE = dict(dim=2048, n_heads=16, n_kv_heads=4, hidden_dim=5632, vocab_size=32000, rope_theta=500000.0)
SMALL = dict(dim=512, n_heads=8, n_kv_heads=2, hidden_dim=1408, vocab_size=8000, rope_theta=500000.0)  # --small

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
kind, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
quantize = None if sys.argv[4] == "none" else sys.argv[4]
from llama.checkpoint import load_model
from llama.model import ModelArgs, Transformer
if kind == "hf-transformers":
    import transformers
if quantize:  # build (or load) the kernels before the baseline
    from llama.generation.quantize import kernels
    kernels()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

# One-time costs that do not grow with the model, paid before the baseline: the first build on the
# `meta` device imports torch's meta-tensor machinery (~70 MB of code and tables).
before = status("VmRSS:")
with torch.device("meta"):
    Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64))
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
t0 = time.perf_counter()
if kind == "ours":
    model = load_model(path, dtype=dtype, quantize=quantize)
elif kind == "meta-reference":  # Meta's llama3 recipe: torch.load, build with real tensors, copy in
    params = json.load(open(f"{path}/params.json"))
    sd = torch.load(f"{path}/consolidated.00.pth", map_location="cpu", weights_only=True)
    torch.set_default_dtype(dtype)
    model = Transformer(ModelArgs(**params))
    model.load_state_dict(sd, strict=True)
    del sd
else:
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype)
load_s = time.perf_counter() - t0
after_load = status("VmHWM:")
named = [*model.named_parameters(), *model.named_buffers()]
tensors = {t.data_ptr(): t for name, t in named if not name.endswith("freqs_cis")}  # not the RoPE table
for t in tensors.values():  # read one byte of every page: mapped pages count once read
    t.detach().reshape(-1).view(torch.uint8)[::4096].sum()
peak = status("VmHWM:")
weights = sum(t.numel() * t.element_size() for t in tensors.values())  # parameters and quantized buffers
print(json.dumps(dict(weights=weights, warmup_mb=(base - before) / 2**20, load_s=load_s, during_load=(after_load - base) / weights,
                      weights_read=(peak - base) / weights)))
"""


def _shapes(shape: dict, n_layers: int) -> dict:
    with torch.device("meta"):
        return {k: v.shape for k, v in Transformer(ModelArgs(**shape, n_layers=n_layers)).state_dict().items()}


FORMATS = ("meta", "meta-2-shards", "hf")


def make_checkpoints(root: Path, size_gb: float, shape: dict, formats=FORMATS) -> dict:
    numel = lambda n: sum(s.numel() for s in _shapes(shape, n).values())  # noqa: E731
    per_layer, fixed = numel(2) - numel(1), 2 * numel(1) - numel(2)
    n_layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))  # bf16: 2 bytes a parameter
    args = ModelArgs(**shape, n_layers=n_layers)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
             for k, s in _shapes(shape, n_layers).items()}
    dirs = {"meta": root / "meta", "meta-2-shards": root / "meta2", "hf": root / "hf"}
    writers = {"meta": lambda d: save_meta(state, args, d), "meta-2-shards": lambda d: save_meta(state, args, d, 2),
               "hf": lambda d: save_hf(state, args, d)}
    for fmt in formats:
        writers[fmt](dirs[fmt])
    return {fmt: dirs[fmt] for fmt in formats}


def measure(kind: str, path: Path, dtype: str, quantize=None) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), dtype, quantize or "none"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {path}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.2, help="size of the bf16 weights")
    parser.add_argument("--small", action="store_true", help="narrower shapes, for a fast test")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for the test)")
    parser.add_argument("--copies-only", action="store_true",
                        help="only the loads that copy (merge, cast): where memory could double")
    parser.add_argument("--no-peers", action="store_true", help="skip the Meta-reference and transformers runs")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="load each format straight into this scheme (no peers)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    args = parser.parse_args(argv)
    runs = [("ours", "meta", "bfloat16"), ("ours", "meta-2-shards", "bfloat16"), ("ours", "hf", "bfloat16"),
            ("ours", "meta", "float32"), ("ours", "hf", "float32")]
    if args.copies_only:
        runs = [("ours", "meta-2-shards", "bfloat16"), ("ours", "hf", "float32")]
    if args.quantize:
        runs = [("ours", fmt, "bfloat16") for fmt in args.formats]
    elif not args.no_peers:
        runs += [("meta-reference", "meta", "bfloat16"), ("hf-transformers", "hf", "bfloat16")]
    runs = [run for run in runs if run[1] in args.formats]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        dirs = make_checkpoints(Path(tmp), args.size_gb, SMALL if args.small else SHAPE,
                                sorted({fmt for _, fmt, _ in runs}))
        target = f" + {args.quantize}" if args.quantize else ""
        results = {f"{kind} {fmt} -> {dtype}{target}": measure(kind, dirs[fmt], dtype, args.quantize)
                   for kind, fmt, dtype in runs}
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{time.perf_counter() - t0:.0f} s in all; peak RSS above the pre-load baseline, "
          f"as a multiple of the loaded weights' bytes (parameters and quantized buffers)")
    print(f"| loader | file -> model dtype | weights (GB) | load (s) | during load | weights read |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        kind, rest = name.split(" ", 1)
        print(f"| {kind} | {rest} | {r['weights'] / 1e9:.2f} | {r['load_s']:.1f} | {r['during_load']:.2f}x "
              f"| {r['weights_read']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
