"""What OpenMP's wait policy costs, quiet and beside a CPU-bound neighbour (llama/common/threads.py).

    python bench/omp_wait.py                      # 3 rounds of each policy, quiet and with 1 busy loop
    python bench/omp_wait.py --compete 2 --rounds 5

A "step" here is 120 two-thread OpenMP regions (torch.add over 300K floats, ~1 MB each), about
as many regions as a compiled SmolLM2 decode step runs, then a 2 ms pause (as sampling leaves
between steps). Each policy runs in a fresh process, because libgomp reads its settings once,
when torch loads it: libgomp's default (spin 300,000 rounds, then sleep), GOMP_SPINCOUNT=10000,
and OMP_WAIT_POLICY=PASSIVE (sleep at once; what generate.py and train.py set unless you set
one). Prints the median milliseconds per step for each, quiet and loaded.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

POLICIES = {"libgomp default": {}, "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
            "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}


def worker(seconds: float, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(300_000), torch.randn(300_000)
    out = torch.empty_like(a)

    def step():
        for _ in range(120):
            torch.add(a, b, out=out)

    for _ in range(3):  # warm-up; under a spinning policy on a busy machine each step takes seconds
        step()
    times, end = [], time.time() + seconds
    while time.time() < end:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        time.sleep(0.002)
    print(f"{1000 * statistics.median(times):.2f}")


def run(env_extra: dict, args, busy: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", "--seconds", str(args.seconds),
                              "--threads", str(args.threads)], env={**env, **env_extra},
                             capture_output=True, text=True, check=True)
    finally:
        for proc in neighbours:
            proc.kill()
            proc.wait()
    return float(out.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compete", type=int, default=1, metavar="N", help="busy-looping processes for the loaded runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.seconds, args.threads)
        return 0
    results = {name: {"quiet": [], "loaded": []} for name in POLICIES}
    for r in range(args.rounds):  # interleaved: drift in the machine's load hits every policy alike
        for name, env in POLICIES.items():
            results[name]["quiet"].append(run(env, args, 0))
            results[name]["loaded"].append(run(env, args, args.compete))
            quiet, loaded = results[name]["quiet"][-1], results[name]["loaded"][-1]
            print(f"round {r + 1} {name}: quiet {quiet:.1f} ms, {args.compete} busy {loaded:.1f} ms; "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n| policy | quiet (ms/step) | with {args.compete} busy (ms/step) |\n|---|---|---|")
    for name, res in results.items():
        print(f"| {name} | {statistics.median(res['quiet']):.1f} | {statistics.median(res['loaded']):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
