"""What the compiled decode step's weight watch costs (llama/generation/compile.py, CompiledStep):
its per-step check in microseconds, and decode tokens/s with and without it, interleaved in one
process on the same compiled graph.

    python bench/compile_watch.py                     # SmolLM2-135M fp32, 8 rounds of 64 tokens each way
    python bench/compile_watch.py --rounds 4 --tokens 32

Without the watch means its per-step check replaced by a function that returns None (a Python call
either way); the per-request check is outside the decode timing. Rounds alternate which side runs
first. Prints the host facts (bench/_host.py), the check's cost, each side's median tok/s and the
median of the per-round ratios.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

from llama.common.threads import set_wait_policy, usable_cpus

set_wait_policy()  # before torch loads OpenMP: wait as generate.py does (llama/common/threads.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import host_facts, matvec_bandwidth  # noqa: E402  (bench/_host.py)

from llama.common import assets  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.generation.compile import keep_freed_memory  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    p.add_argument("--threads", type=int, default=usable_cpus())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as generate.py does
    print("; ".join(f"{k} {v}" for k, v in host_facts("cpu", args.threads, matvec_bandwidth("cpu")).items()))
    llama = Llama.build(assets.smollm2_gguf(), max_seq_len=512, max_batch_size=1, device="cpu", compile=True)
    prompt = [llama.encode_prompt("The old lighthouse stood at the edge of the cliff, and every night")]
    start = time.perf_counter()
    llama.generate(prompt, 4, temperature=0.0)
    print(f"compiled in {time.perf_counter() - start:.0f} s")
    step, watch = llama._decode, llama._decode.watch
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        assert watch.change(llama.model) is None
    check_us = (time.perf_counter() - start) / n * 1e6
    print(f"per-step check: {check_us:.1f} us over {len(watch.tracked)} tensors")
    real_change = watch.change
    speeds = {"with the watch": [], "without": []}
    for r in range(args.rounds):
        for side in (["with the watch", "without"] if r % 2 == 0 else ["without", "with the watch"]):
            watch.change = real_change if side == "with the watch" else (lambda model, full=False: None)
            llama.generate(prompt, args.tokens, temperature=0.0)
            speeds[side].append(llama.stats.decode_tokens_per_s)
    watch.change = real_change
    assert llama._decode is step
    for side, values in speeds.items():
        print(f"{side:<16} median {statistics.median(values):6.1f} tok/s  ({', '.join(f'{v:.1f}' for v in values)})")
    # each round ran both sides back to back: the ratio within a round cancels most of the load's drift
    paired = sorted(a / b for a, b in zip(speeds["with the watch"], speeds["without"]))
    per_step_ms = 1000 / statistics.median(speeds["without"])
    print(f"with / without, per round: median {statistics.median(paired):.3f} (quartiles "
          f"{paired[len(paired) // 4]:.3f}-{paired[3 * len(paired) // 4]:.3f}); the check is "
          f"{check_us / 1000 / per_step_ms:.2%} of a {per_step_ms:.1f} ms step")


if __name__ == "__main__":
    main()
