"""The group-wise kernel alone (llama/generation/csrc/quantized.cpp): a decode step's matrix-vector
products, each on its own random weights (so they stream from memory as in a real step), no model
around them. Prints ms per step and GB/s per kind and thread count, beside a 256 MB fp32
matrix-vector product (the memory's speed as MKL's GEMV reaches it), all in interleaved rounds of one
process (best of each: the machine is shared).

    flock /tmp/llama-bench.lock python bench/quant_kernel.py --rounds 12                  # SmolLM2-135M
    python bench/quant_kernel.py --shape 8b --layers 2 --threads 1 --clock cpu            # 8B, Q4_0/Q8_0 too
    python bench/quant_kernel.py --shape 8b --layers 1 --rows 16 128 512 --gemm --threads 1 --clock cpu

--shape 8b: two of Llama 3.1 8B's 32 layers (wq, wk, wv, wo, w1, w3, w2), also as llama.cpp's Q4_0 and
Q8_0 blocks (`gguf.quants`, multiplied as a GGUF file stores them). --rows M: M activation rows (a
prefill chunk) instead of 1; --gemm adds what the layer does above PREFILL_ROWS (the GEMM on
tiles of dequantized weights) and the GEMM on the whole dequantized matrix. --clock cpu: this thread's
CPU time instead of wall time (with --threads 1: a kernel's own cost on a busy machine).

What it leaves out, and bench/generate.py / bench/synthetic.py measure: the rest of a step (norms,
RoPE, attention, the Python that calls each kernel), which is why a step takes longer than this.
"""

import argparse
import time
import unittest.mock

from llama.common.threads import set_wait_policy

set_wait_policy()  # as generate.py: before torch loads OpenMP

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama.generation import quantize  # noqa: E402

# (out, in) of wq, wk, wv, wo, w1, w3, w2 per layer
SMOLLM2 = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LLAMA_8B = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def gguf_layer(w: torch.Tensor, kind: str) -> quantize.GGUFLinear:
    """w quantized by llama.cpp's arithmetic (the gguf package) into its blocks."""
    import gguf

    raw = gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, kind))
    return quantize.GGUFLinear(torch.from_numpy(raw).view(w.shape[0], w.shape[1] // 32, -1), kind)


KINDS = {"int8 group 64": lambda w: quantize.GroupInt8Linear(w, 64), "int4 group 32": lambda w: quantize.Int4Linear(w, 32),
         "Q8_0": lambda w: gguf_layer(w, "Q8_0"), "Q4_0": lambda w: gguf_layer(w, "Q4_0")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["smollm2", "8b"], default="smollm2")
    parser.add_argument("--layers", type=int, help="default: SmolLM2's 30 (+ its output layer), 8B: 2")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="activation rows per product")
    parser.add_argument("--gemm", action="store_true", help="also the dequantize + GEMM paths (the layer's, and fp32 on the whole weight)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), help="default: ours (SmolLM2), all (8B)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.shape == "8b":
        shapes = LLAMA_8B * (args.layers or 2)
    else:
        shapes = SMOLLM2 * (args.layers or 30) + [(49152, 576)]
    kinds = args.kinds or (list(KINDS) if args.shape == "8b" else ["int8 group 64", "int4 group 32"])
    layers = {kind: [KINDS[kind](torch.randn(n, k) * 0.02) for n, k in shapes] for kind in kinds}
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    w, v = torch.randn(8192, 8192), torch.randn(8192, 1)
    best = {}

    def timed(key, run):
        start = clock()
        run()
        best[key] = min(best.get(key, float("inf")), clock() - start)

    def tiled(layer, x):  # what GroupLinear.forward runs above PREFILL_ROWS, at any row count
        with unittest.mock.patch.object(quantize, "PREFILL_ROWS", 0):
            return layer(x)

    for _ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for rows in args.rows:
                x = {k: torch.randn(rows, k) for k in {k for _, k in shapes}}
                for kind, step in layers.items():
                    timed((kind, threads, rows, "kernel"), lambda: [layer.product(x[layer.in_features]) for layer in step])
                    if args.gemm:
                        timed((kind, threads, rows, "tiled GEMM"), lambda: [tiled(layer, x[layer.in_features]) for layer in step])
                        timed((kind, threads, rows, "whole GEMM"),
                              lambda: [F.linear(x[layer.in_features], layer.dequantized()) for layer in step])
            timed(("fp32 matvec 256 MB", threads, 1, ""), lambda: w @ v)
    for (kind, threads, rows, path), seconds in best.items():
        if kind in layers:
            nbytes = sum(b.numel() * b.element_size() for layer in layers[kind] for b in layer.buffers())
            print(f"{kind}, {threads} thread(s), {rows} row(s), {path}: {seconds * 1e3:.1f} ms per step, "
                  f"{nbytes / seconds / 1e9:.1f} GB/s of weights")
        else:
            print(f"{kind}, {threads} thread(s): {w.numel() * 4 / seconds / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
