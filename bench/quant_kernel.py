"""The group-wise decode kernel alone (llama/generation/csrc/quantized.cpp): a SmolLM2-135M decode step's 211
matrix-vector products, each on its own random weights (so they stream from memory as in a real step,
~84-139 MB), one activation row, no model around them. Prints ms per step and GB/s per kind and thread
count, beside a 256 MB fp32 matrix-vector product (the memory's speed as MKL's GEMV reaches it), all
in interleaved rounds of one process (best of each: the machine is shared).

    flock /tmp/llama-bench.lock python bench/quant_kernel.py --rounds 12

What it leaves out, and bench/generate.py measures: the rest of a compiled step (norms, RoPE,
attention, the Python that calls each kernel), which is why a step takes longer than this.
"""

import argparse
import time

from llama.common.threads import set_wait_policy

set_wait_policy()  # as generate.py: before torch loads OpenMP

import torch  # noqa: E402

from llama.generation import quantize  # noqa: E402

# SmolLM2-135M: (out, in) of wq, wk, wv, wo, w1, w3, w2 per layer, 30 layers, then the output layer
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SHAPES = LAYER * 30 + [(49152, 576)]
KINDS = {"int8 group 64": lambda w: quantize.GroupInt8Linear(w, 64), "int4 group 32": lambda w: quantize.Int4Linear(w, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = {kind: [make(torch.randn(n, k) * 0.02) for n, k in SHAPES] for kind, make in KINDS.items()}
    x = {k: torch.randn(1, k) for k in (576, 1536)}
    w, v = torch.randn(8192, 8192), torch.randn(8192, 1)
    best = {}

    def timed(key, run):
        start = time.perf_counter()
        run()
        best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)

    for _ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for kind, step in layers.items():
                timed((kind, threads), lambda: [layer.product(x[layer.in_features]) for layer in step])
            timed(("fp32 matvec 256 MB", threads), lambda: w @ v)
    for (kind, threads), seconds in best.items():
        if kind in layers:
            nbytes = sum(b.numel() * b.element_size() for layer in layers[kind] for b in layer.buffers())
            print(f"{kind}, {threads} thread(s): {seconds * 1e3:.1f} ms per step, {nbytes / seconds / 1e9:.1f} GB/s")
        else:
            print(f"{kind}, {threads} thread(s): {w.numel() * 4 / seconds / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
