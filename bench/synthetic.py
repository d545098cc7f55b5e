"""Llama 3.1 8B (and 3.2 1B / 3B) shapes with random weights: llama-ref beside llama.cpp on the very same
files, load time, peak memory, prefill and decode speed, in one run.

    flock /tmp/llama-bench.lock python bench/synthetic.py --shape 8b --dir /work/scratch-8b --hf \
        --json docs/records/bench-synthetic-8b-DATE.json
    python bench/synthetic.py --shape 1b --pairs int4 --repeat 1 --rounds 1 --new-tokens 8 --prefill-tokens 16 --no-compile
    python bench/synthetic.py --shape 70b --pairs int4 --direct --llamacpp-no-repack --no-compile --repeat 1 \
        --rounds 1 --prefill-tokens 16 --new-tokens 4   # 40 GB of Q4_0 on a 23 GB machine: paged from disk

The weights are random, of the official shape (bench/_synthetic.py writes them, a few minutes for 8B:
GGUF bf16 by the `gguf` package's writer, Q8_0 / Q4_0 by llama.cpp's own quantizer, HF bf16 shards by
safetensors), so speed and memory are those of the real model; what the model says is noise.

Pairs, each on one file: ours `--quantize int4` vs llama.cpp on a Q4_0 file (ours uses the file's own
Q4_0 blocks; its Q6_K output matrix is requantized to our int4), int8 vs Q8_0, bf16 vs BF16.
- load, in a fresh process per engine and round (rounds interleaved, the page cache warm): seconds to
  a model ready to run (llama.cpp: `Llama(...)`; ours: `Llama.build`, tokenizer included), and peak
  resident memory (VmHWM) above the process's baseline just before loading, beside the weights' bytes,
  at the end of loading and after one decode step (a mapped file's pages count once read);
- speed, all engines of a pair in one process (they share the file's pages), in --repeat interleaved
  --rounds [llama.cpp, ours, ours compiled], so that load from other users reaches them alike, each
  number the best of its rounds (the spread is recorded): prefill, a --prefill-tokens prompt of random
  ids to its first new token; decode, --new-tokens greedy tokens after a 4-token prompt, tokens/s over
  the steps after the first, and the weight bytes one step reads x tokens/s over the matrix-vector
  bandwidth bench/_host.py measures; and the process's CPU time per decoded token (all its threads:
  with --threads 1, each engine's own cost per token, which other users' load barely moves), and the
  bytes read from storage per decoded token (/proc/self/io: 0 while the weights fit in the page cache).
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


def build(spec: dict, threads: int):
    """The engine a spec names (bench/generate.py's engines: the same code as its SmolLM2 runs)."""
    import generate

    engine_args = argparse.Namespace(device="cpu", threads=threads)
    if spec["engine"] == "llama.cpp":
        return generate.LlamaCpp(spec["path"], engine_args, repack=spec.get("repack", True))
    return generate.Ours(spec["path"], engine_args, spec.get("quantize"), compile=spec.get("compile", False),
                         dtype=spec.get("dtype"))


def _disk_reads() -> int:
    """Bytes this process has had read from storage (page-cache hits not counted)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def child_load(spec: dict, threads: int) -> dict:
    """Load one engine in this fresh process: seconds, and peak memory above the baseline."""
    torch.set_num_threads(threads)
    if spec["engine"] == "ours" and spec.get("quantize"):
        from llama.generation.quantize import kernels
        kernels()  # built before the baseline: a one-time cost, not the model's memory
    base = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    engine = build(spec, threads)
    out = {"load_s": time.perf_counter() - start, "load_peak": _status("VmHWM:") - base, "weights": engine.weights}
    engine.decode([1000, 1001, 1002, 1003], 2)  # a step reads every weight: mapped pages count from here
    out["step_peak"] = _status("VmHWM:") - base
    return out


def child_speed(specs: dict, threads: int, prefill: int, new: int, rounds: int) -> dict:
    """Every engine of a pair in this one process, warmed, then `rounds` interleaved rounds of a prefill
    and a decode each: {name: {"prefill": [tok/s per round], "decode": [...], "step_bytes", "warmup_s"}}."""
    torch.set_num_threads(threads)
    prompt = torch.randint(1000, 100000, (prefill,), generator=torch.Generator().manual_seed(0)).tolist()
    short = prompt[:4]
    engines, out = {}, {}
    for name, spec in specs.items():
        start = time.perf_counter()
        engines[name] = engine = build(spec, threads)
        engine.decode(short, 4)  # first steps (compiling, for a compiled engine), thread pools
        out[name] = {"warmup_s": time.perf_counter() - start, "step_bytes": engine.bytes, "prefill": [], "decode": [],
                     "decode_cpu_ms": []}
    for r in range(rounds):
        for name, engine in engines.items():
            out[name]["prefill"].append(len(prompt) / engine.prefill(prompt))
            cpu, disk = time.process_time(), _disk_reads()
            seconds, _ = engine.decode(short, new)
            out[name]["decode"].append((new - 1) / seconds)
            out[name]["decode_cpu_ms"].append((time.process_time() - cpu) / new * 1e3)  # every thread's, per token
            out[name].setdefault("decode_disk_gb", []).append((_disk_reads() - disk) / new / 1e9)  # from storage
        print(f"round {r + 1}: " + "; ".join(f"{k} {v['decode'][-1]:.2f}" for k, v in out.items()) + " tok/s",
              file=sys.stderr, flush=True)
    out["peak_gib"] = _status("VmHWM:") / 2**30
    return out


def run_child(job: dict, timeout: int) -> dict:
    """A child process running child_load or child_speed (job: their arguments and "kind")."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE,
                          stderr=None if job["kind"] == "speed" else subprocess.PIPE, text=True, timeout=timeout,
                          cwd=Path(__file__).parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{job}: {(proc.stderr or '')[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(job: dict) -> dict:
    if job["kind"] == "load":
        return child_load(job["spec"], job["threads"])
    return child_speed(job["specs"], job["threads"], job["prefill"], job["new"], job["rounds"])


# ---------------------------------------------------------------------------- files


def write_files(args, shape_args) -> dict:
    """{file kind: path}, written where missing."""
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for pair in args.pairs:  # the BF16 file only where a pair reads it or a quantized file is missing
        kind = PAIRS[pair][0]
        path = root / f"{args.shape}-{kind}.gguf"
        if args.direct and kind != "BF16":  # every matrix in `kind`, by the gguf package, as it is written
            files[kind] = _synthetic.write_gguf(shape_args, path, kind)
            continue
        if kind == "BF16" or not path.exists():
            files["BF16"] = _synthetic.write_gguf(shape_args, root / f"{args.shape}-BF16.gguf")
        if kind != "BF16":
            files[kind] = _synthetic.llamacpp_quantize(files.get("BF16"), path, kind, args.threads)
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


def engines_for(pair: str, path: Path, args) -> dict:
    """{row name: spec} of a pair, in the order of a round: llama.cpp, ours, ours compiled."""
    kind, target = PAIRS[pair]
    specs = {f"llama.cpp {kind}": dict(path=str(path), engine="llama.cpp", repack=not args.llamacpp_no_repack),
             f"llama-ref {pair}": dict(path=str(path), engine="ours", **target)}
    if not args.no_compile:
        specs[f"llama-ref {pair} + torch.compile"] = dict(path=str(path), engine="ours", compile=True, **target)
    return specs


def measure(args, files) -> dict:
    """{row name: {"load": [per process], "prefill": [per round], "decode": [...], ...}}."""
    results = {}
    loads = [(name, spec) for pair in args.pairs for name, spec in engines_for(pair, files[PAIRS[pair][0]], args).items()
             if not spec.get("compile")]  # compiling happens at the first step, not at load
    if args.hf:
        loads.append(("llama-ref HF bf16 -> int4", dict(path=str(files["HF"]), engine="ours", quantize="int4")))
    for path in {spec["path"] for _, spec in loads}:
        warm_page_cache(Path(path))
    for r in range(args.repeat):
        for name, spec in loads:
            result = run_child(dict(kind="load", spec=spec, threads=args.threads), args.timeout)
            results.setdefault(name, {}).setdefault("load", []).append(result)
            print(f"load {r + 1} {name}: {result['load_s']:.1f} s, peak {result['load_peak'] / 2**30:.2f} GiB", flush=True)
    for pair in args.pairs:
        path = files[PAIRS[pair][0]]
        warm_page_cache(path)
        specs = engines_for(pair, path, args)
        speed = run_child(dict(kind="speed", specs=specs, threads=args.threads, prefill=args.prefill_tokens,
                               new=args.new_tokens, rounds=args.rounds), args.timeout)
        for name in specs:
            results.setdefault(name, {}).update(speed[name], speed_process_peak_gib=round(speed["peak_gib"], 2))
    return results


def summarize(results: dict, bandwidth: float) -> list:
    """One row per engine: the best of its rounds (fastest load and steps, least memory)."""
    rows = []
    for name, r in results.items():
        row = {"engine": name}
        if "load" in r:
            row.update(weights_gb=round(r["load"][0]["weights"] / 1e9, 3),
                       load_s=round(min(x["load_s"] for x in r["load"]), 2),
                       load_peak_gib=round(min(x["load_peak"] for x in r["load"]) / 2**30, 2),
                       step_peak_gib=round(min(x["step_peak"] for x in r["load"]) / 2**30, 2))
        if r.get("decode"):
            decode = max(r["decode"])
            row.update(prefill_tok_s=round(max(r["prefill"]), 2), decode_tok_s=round(decode, 2),
                       decode_cpu_ms=round(min(r.get("decode_cpu_ms") or [float("nan")]), 1),
                       decode_disk_gb=round(min(r.get("decode_disk_gb") or [float("nan")]), 3),
                       gb_per_token=round(r["step_bytes"] / 1e9, 3),
                       share_of_matvec=round(r["step_bytes"] * decode / 1e9 / bandwidth, 3),
                       warmup_s=round(r["warmup_s"], 1))
        rows.append(row)
    return rows


def ratios(rows) -> dict:
    """Ours over llama.cpp's, per pair: decode and prefill speed (> 1: faster), load time, peak memory and
    CPU time per decoded token (< 1: less)."""
    by = {r["engine"]: r for r in rows}
    out = {}
    for pair, (kind, _) in PAIRS.items():
        cpp = by.get(f"llama.cpp {kind}")
        for suffix in ("", " + torch.compile"):
            ours = by.get(f"llama-ref {pair}{suffix}")
            for field in ("decode_tok_s", "prefill_tok_s", "load_s", "load_peak_gib", "step_peak_gib", "decode_cpu_ms"):
                if cpp and ours and cpp.get(field) and ours.get(field):
                    out[f"{pair}{suffix} {field} / llama.cpp {kind}"] = round(ours[field] / cpp[field], 3)
    return out


def print_table(rows, args) -> None:
    print(f"\n| engine | weights (GB) | load (s) | peak RSS loading / after a step (GiB) | prefill {args.prefill_tokens} "
          f"(tok/s) | decode (tok/s) | GB read/token | % of matvec | CPU ms/token | GB from disk/token |")
    print("|---" * 10 + "|")
    for r in rows:
        cells = [r["engine"]]
        cells += ([f"{r['weights_gb']:.2f}", f"{r['load_s']:.1f}", f"{r['load_peak_gib']:.2f} / {r['step_peak_gib']:.2f}"]
                  if "load_s" in r else [""] * 3)
        if "decode_tok_s" in r:
            cells += [f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}", f"{r['gb_per_token']:.2f}",
                      f"{100 * r['share_of_matvec']:.0f}%", f"{r['decode_cpu_ms']:.0f}", f"{r['decode_disk_gb']:.2f}"]
        else:
            cells += [""] * 6
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(_synthetic.SHAPES), default="8b")
    p.add_argument("--dir", default=str(cache_dir() / "synthetic"), help="where the files are written (GBs)")
    p.add_argument("--pairs", nargs="*", choices=list(PAIRS), default=["int4", "int8"], help="none: --hf alone")
    p.add_argument("--hf", action="store_true", help="also write the HF bf16 dir and time HF bf16 -> int4")
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2, help="fresh-process loads of each engine")
    p.add_argument("--rounds", type=int, default=4, help="interleaved speed rounds")
    p.add_argument("--no-compile", action="store_true", help="eager engines only")
    p.add_argument("--direct", action="store_true",
                   help="write the quantized files directly (the gguf package's quantizer, every matrix), with no "
                        "BF16 file first: for shapes whose BF16 file does not fit on the disk (70B: 141 GB)")
    p.add_argument("--llamacpp-no-repack", action="store_true",
                   help="llama.cpp as `--no-repack`: its weights stay in the mapped file (its default copies "
                        "Q4_0/Q8_0 into repacked buffers, a second copy in memory: no room for a file larger than RAM)")
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
