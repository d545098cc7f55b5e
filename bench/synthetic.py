"""Llama 3.1 8B (and 3.2 1B / 3B) shapes with random weights: llama-ref beside llama.cpp on the very same
files, load time, peak memory, prefill and decode speed, in one run.

    flock /tmp/llama-bench.lock python bench/synthetic.py --shape 8b --dir /work/scratch-8b --hf \
        --json docs/records/bench-synthetic-8b-DATE.json
    python bench/synthetic.py --shape 1b --pairs int4 --repeat 1 --new-tokens 8 --prefill-tokens 16 --no-compile

The weights are random, of the official shape (bench/_synthetic.py writes them, a few minutes for 8B:
GGUF bf16 by the `gguf` package's writer, Q8_0 / Q4_0 by llama.cpp's own quantizer, HF bf16 shards by
safetensors), so speed and memory are those of the real model; what the model says is noise.

Pairs, each on one file: ours `--quantize int4` vs llama.cpp on a Q4_0 file (ours uses the file's own
Q4_0 blocks; its Q6_K output matrix is requantized to our int4), int8 vs Q8_0, bf16 vs BF16. Every
engine runs in a fresh process per round (its load time and peak memory are its own, and two 8B
models never share the memory), rounds ordered [llama.cpp, ours, ours compiled, llama.cpp] so that
load from other users reaches both; each number is the best of --repeat rounds. Measured per process:
- load: seconds from a warm page cache to a model ready to run (llama.cpp: `Llama(...)`; ours:
  `Llama.build`, tokenizer included), and peak resident memory (VmHWM) above the process's baseline
  just before loading, beside the weights' bytes;
- prefill: a --prefill-tokens prompt of random ids to its first new token, tokens/s;
- decode: --new-tokens greedy tokens after a 4-token prompt, tokens/s over the steps after the first;
  the weight bytes one step reads x tokens/s, over the matrix-vector bandwidth bench/_host.py measures.
--hf also times HF bf16 -> int4 (load only: llama.cpp reads no safetensors).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llama.common.threads import set_wait_policy, usable_cpus

set_wait_policy()  # before torch loads OpenMP, here and in every child (they inherit the environment)

import torch  # noqa: E402

from llama.common.assets import cache_dir  # noqa: E402
from llama.common.files import write_text  # noqa: E402

import _synthetic  # noqa: E402  (bench/_synthetic.py)
from _host import host_facts, matvec_bandwidth  # noqa: E402

PAIRS = {"int4": ("Q4_0", dict(quantize="int4")), "int8": ("Q8_0", dict(quantize="int8")),
         "bf16": ("BF16", dict(dtype="bfloat16"))}


# ---------------------------------------------------------------------------- one engine, one process


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def child(spec: dict) -> dict:
    """Load one engine, measure it, return the numbers (runs in its own process)."""
    import generate  # bench/generate.py: the engines (same code as its SmolLM2 runs)

    torch.set_num_threads(spec["threads"])
    engine_args = argparse.Namespace(device="cpu", threads=spec["threads"])
    if spec["engine"] == "ours":
        from llama.generation.quantize import kernels
        if spec.get("quantize"):
            kernels()  # built before the baseline: a one-time cost, not the model's memory
    base = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    if spec["engine"] == "llama.cpp":
        engine = generate.LlamaCpp(spec["path"], engine_args)
    else:
        engine = generate.Ours(spec["path"], engine_args, spec.get("quantize"), compile=spec["compile"],
                               dtype=spec.get("dtype"))
    out = {"load_s": time.perf_counter() - start, "load_peak": _status("VmHWM:") - base,
           "weights": engine.weights, "step_bytes": engine.bytes}
    if spec.get("load_only"):
        return out
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 100000, (spec["prefill"],), generator=gen).tolist()
    short = prompt[:4]
    warm = time.perf_counter()
    engine.decode(short, 4)  # first steps (compiling, for a compiled engine), thread pools
    out["warmup_s"] = time.perf_counter() - warm
    out["prefill_tok_s"] = len(prompt) / engine.prefill(prompt)
    seconds, _ = engine.decode(short, spec["new"])
    out["decode_tok_s"] = (spec["new"] - 1) / seconds
    out["peak"] = _status("VmHWM:") - base
    return out


def run_child(spec: dict, timeout: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['engine']} {spec['path']}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- files


def write_files(args, shape_args) -> dict:
    """{file kind: path}, written where missing."""
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    bf16 = _synthetic.write_gguf(shape_args, root / f"{args.shape}-BF16.gguf")
    files = {"BF16": bf16}
    for pair in args.pairs:
        kind = PAIRS[pair][0]
        if kind != "BF16":
            files[kind] = _synthetic.llamacpp_quantize(bf16, root / f"{args.shape}-{kind}.gguf", kind, args.threads)
    if args.hf:
        files["HF"] = _synthetic.write_hf(shape_args, root / f"{args.shape}-hf-bf16")
    return files


def warm_page_cache(path: Path) -> float:
    """Read the file (every file of a directory) once, so that no engine pays the disk: seconds taken."""
    start = time.perf_counter()
    for f in ([path] if path.is_file() else sorted(path.iterdir())):
        with open(f, "rb") as src:
            while src.read(1 << 24):
                pass
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- the run


def engines_for(pair: str, path: Path, args) -> list:
    """[(row name, spec)] in the order of a round: llama.cpp, ours eager, ours compiled, llama.cpp again."""
    kind, target = PAIRS[pair]
    common = dict(path=str(path), threads=args.threads, prefill=args.prefill_tokens, new=args.new_tokens)
    cpp = (f"llama.cpp {kind}", dict(common, engine="llama.cpp"))
    ours = [(f"llama-ref {pair}", dict(common, engine="ours", compile=False, **target))]
    if not args.no_compile:
        ours.append((f"llama-ref {pair} + torch.compile", dict(common, engine="ours", compile=True, **target)))
    return [cpp] + ours + [cpp]


def measure(args, files) -> dict:
    """{row name: [result of each process]} for every pair, rounds interleaved as engines_for orders them."""
    results = {}
    for r in range(args.repeat):
        for pair in args.pairs:
            kind = PAIRS[pair][0]
            warmed = warm_page_cache(files[kind])
            for name, spec in engines_for(pair, files[kind], args):
                result = run_child(spec, args.timeout)
                result["page_cache_warm_s"] = round(warmed, 1)
                results.setdefault(name, []).append(result)
                print(f"round {r + 1} {name}: load {result['load_s']:.1f} s, peak {result['peak'] / 2**30:.2f} GiB, "
                      f"prefill {result['prefill_tok_s']:.1f} tok/s, decode {result['decode_tok_s']:.2f} tok/s",
                      flush=True)
    if args.hf:
        warm_page_cache(files["HF"])
        for r in range(args.repeat):
            spec = dict(path=str(files["HF"]), engine="ours", compile=False, quantize="int4", threads=args.threads,
                        load_only=True)
            result = run_child(spec, args.timeout)
            results.setdefault("llama-ref HF bf16 -> int4 (load only)", []).append(result)
            print(f"round {r + 1} HF bf16 -> int4: load {result['load_s']:.1f} s, "
                  f"peak {result['load_peak'] / 2**30:.2f} GiB", flush=True)
    return results


def summarize(results: dict, bandwidth: float) -> list:
    """One row per engine: the best of its rounds (fastest load and steps, lowest peak), and the spread."""
    rows = []
    for name, runs in results.items():
        row = {"engine": name, "runs": len(runs), "weights_gb": round(runs[0]["weights"] / 1e9, 3),
               "load_s": round(min(r["load_s"] for r in runs), 2),
               "load_s_spread": [round(r["load_s"], 2) for r in runs],
               "load_peak_gib": round(min(r["load_peak"] for r in runs) / 2**30, 2)}
        if "decode_tok_s" in runs[0]:
            decode = max(r["decode_tok_s"] for r in runs)
            row.update(peak_gib=round(min(r["peak"] for r in runs) / 2**30, 2),
                       prefill_tok_s=round(max(r["prefill_tok_s"] for r in runs), 2),
                       decode_tok_s=round(decode, 2), decode_spread=[round(r["decode_tok_s"], 2) for r in runs],
                       gb_per_token=round(runs[0]["step_bytes"] / 1e9, 3),
                       share_of_matvec=round(runs[0]["step_bytes"] * decode / 1e9 / bandwidth, 3),
                       warmup_s=round(max(r["warmup_s"] for r in runs), 1))
        rows.append(row)
    return rows


def ratios(rows) -> dict:
    by = {r["engine"]: r for r in rows}
    out = {}
    for pair, (kind, _) in PAIRS.items():
        cpp = by.get(f"llama.cpp {kind}")
        for suffix in ("", " + torch.compile"):
            ours = by.get(f"llama-ref {pair}{suffix}")
            if cpp and ours:
                for field in ("decode_tok_s", "prefill_tok_s"):
                    out[f"{pair}{suffix} {field} / llama.cpp {kind}"] = round(ours[field] / cpp[field], 3)
                out[f"{pair}{suffix} load_s / llama.cpp {kind}"] = round(ours["load_s"] / cpp["load_s"], 3)
                out[f"{pair}{suffix} peak / llama.cpp {kind}"] = round(ours["peak_gib"] / cpp["peak_gib"], 3)
    return out


def print_table(rows, args) -> None:
    print(f"\n| engine | weights (GB) | load (s) | load peak (GiB) | peak (GiB) | prefill {args.prefill_tokens} (tok/s) "
          f"| decode (tok/s) | GB read/token | % of matvec |")
    print("|---" * 9 + "|")
    for r in rows:
        cells = [r["engine"], f"{r['weights_gb']:.2f}", f"{r['load_s']:.1f}", f"{r['load_peak_gib']:.2f}"]
        if "decode_tok_s" in r:
            cells += [f"{r['peak_gib']:.2f}", f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}",
                      f"{r['gb_per_token']:.2f}", f"{100 * r['share_of_matvec']:.0f}%"]
        else:
            cells += ["", "", "", "", ""]
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(_synthetic.SHAPES), default="8b")
    p.add_argument("--dir", default=str(cache_dir() / "synthetic"), help="where the files are written (GBs)")
    p.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=["int4", "int8"])
    p.add_argument("--hf", action="store_true", help="also write the HF bf16 dir and time HF bf16 -> int4")
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="eager engines only")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per engine process")
    p.add_argument("--json", type=Path, help="write the record (host facts, every process's numbers, rows) here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    torch.set_num_threads(args.threads)
    shape_args = _synthetic.shape_args(args.shape)
    start = time.perf_counter()
    files = write_files(args, shape_args)
    print(f"files ready in {time.perf_counter() - start:.0f} s: " +
          ", ".join(f"{k} {v} ({_size(v) / 1e9:.2f} GB)" for k, v in files.items()), flush=True)
    host = host_facts("cpu", args.threads, matvec_bandwidth("cpu"))
    host["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    print("; ".join(f"{k} {v}" for k, v in host.items()), flush=True)
    results = measure(args, files)
    host["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    rows = summarize(results, host["matvec_gbs"])
    print_table(rows, args)
    for what, value in ratios(rows).items():
        print(f"{what}: {value:.2f}x")
    if args.json:
        record = {"host": host, "shape": args.shape, "model_args": repr(shape_args),
                  "args": {k: str(v) for k, v in vars(args).items() if k != "child"},
                  "files": {k: {"path": str(v), "bytes": _size(v)} for k, v in files.items()},
                  "rows": rows, "ratios": ratios(rows), "processes": results}
        write_text(args.json, json.dumps(record, indent=1) + "\n")
    return 0


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())


if __name__ == "__main__":
    sys.exit(main())
