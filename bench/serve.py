"""Serving throughput: N clients at once vs the same N requests one after another.

Starts `python -m llama.serve` (SmolLM2-135M-Instruct unless --ckpt-dir), then sends N completion
requests through the `openai` client, sequentially and concurrently, in alternating rounds (so that a
neighbour's load hits both alike), and reports generated tokens per second of wall time for each.

    python bench/serve.py --json docs/records/bench-serve-DATE.json
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama.common.files import write_text  # noqa: E402
from llama.common.threads import usable_cpus  # noqa: E402

from _host import host_facts, matvec_bandwidth  # noqa: E402  (bench/_host.py)

PROMPTS = ["The history of the Roman Empire begins", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are", "def quicksort(items):", "My favourite recipe for bread is",
           "The tallest mountains in the world are", "A short guide to learning the piano:", "1, 2, 3, 4, 5,"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llama.serve", "--port", str(port), "--max-batch-size", str(args.clients),
           "--max-seq-len", "512"] + (["--ckpt-dir", args.ckpt_dir] if args.ckpt_dir else [])
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            raise SystemExit("the server did not come up in 10 minutes")
        time.sleep(0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", help="None: SmolLM2-135M-Instruct")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the record here")
    args = p.parse_args(argv)
    import openai

    port = free_port()
    server = start_server(args, port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    prompts = (PROMPTS * args.clients)[: args.clients]

    def ask(prompt):  # sampled with a fixed seed: every request generates max_tokens tokens unless EOS
        r = client.completions.create(model="m", prompt=prompt, max_tokens=args.max_tokens, temperature=1.0,
                                      seed=1)
        return r.usage.completion_tokens

    try:
        ask(prompts[0])  # warm up
        rows = {"sequential": [], "concurrent": []}
        for _ in range(args.rounds):
            for mode in rows:
                start = time.perf_counter()
                if mode == "sequential":
                    tokens = sum(ask(q) for q in prompts)
                else:
                    with ThreadPoolExecutor(args.clients) as pool:
                        tokens = sum(pool.map(ask, prompts))
                seconds = time.perf_counter() - start
                rows[mode].append({"tokens": tokens, "seconds": round(seconds, 3),
                                   "tokens_per_s": round(tokens / seconds, 2)})
                print(mode, rows[mode][-1], flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    median = {m: statistics.median(r["tokens_per_s"] for r in rows[m]) for m in rows}
    ratio = median["concurrent"] / median["sequential"]
    print(f"{args.clients} clients: {median['concurrent']:.1f} tokens/s concurrent vs {median['sequential']:.1f} "
          f"sequential: {ratio:.2f}x", flush=True)
    if args.json:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        record = {"date": time.strftime("%Y-%m-%d"), "revision": revision,
                  "command": "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "host": host_facts("cpu", torch.get_num_threads() or usable_cpus(), matvec_bandwidth("cpu")),
                  "model": args.ckpt_dir or "SmolLM2-135M-Instruct (Q4_1 GGUF, run in fp32)",
                  "clients": args.clients, "max_tokens": args.max_tokens, "rounds": rows,
                  "median_tokens_per_s": median, "concurrent_over_sequential": round(ratio, 2),
                  "server_threads": os.environ.get("OMP_NUM_THREADS", "default")}
        write_text(args.json, json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
