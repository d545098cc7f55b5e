"""What quantization costs in accuracy: ours (int8, int4, by group size) beside llama.cpp's Q8_0/Q4_0.

    python bench/quant_accuracy.py                     # the docs/quantization.md table (~10 min on 2 cores)
    python bench/quant_accuracy.py --tokens 1024 --skip llamacpp
    python bench/quant_accuracy.py --chat 8 --reply-len 32   # chat-formatted prompts, the model's own replies

Teacher-forced over real text (KJV Genesis, the evaluation text of bench/eval.py) in disjoint windows of
--window tokens, each starting with the tokenizer's prefix token: every quantized model reads the same
tokens as the fp32 model, and at each position its next-token distribution q is compared with the fp32
one p: top-1 agreement (argmax q == argmax p), mean KL(p || q) in nats, and the perplexity of the text
(exp of the mean -log q(next token): the disjoint-window protocol of llama/eval/perplexity.py).

--chat N: instead of the text, N chat prompts (the first N questions of the mmlu-smoke set, each a user
message in SmolLM2's chat format) followed by the fp32 model's own greedy reply (--reply-len tokens);
only the reply's positions are scored (llama/eval/agreement.py), as a chat model is used. It adds a row
for int4 with the output projection at 4 bits too (what --quantize int4 did before it kept 8 bits there).

Weights: SmolLM2-135M-Instruct from llama.common.assets, dequantized once to fp32; llama.cpp's Q8_0, Q4_0 and
Q4_1 files are made by its own quantizer (llama_model_quantize) from an F32 GGUF of those same weights
(bench/generate.py's helpers), and its logits come through llama-cpp-python with logits_all=True.
Note: that GGUF ships as Q4_1 (4-bit groups of 32 with a min and a scale), so "fp32" here is a 4-bit
model dequantized: a 4-bit scheme whose groups line up with those blocks (our int4 with group 32, and
llama.cpp's Q4_1) re-finds the same grid and looks nearly free; other group sizes show the real cost.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llama.common import assets
from llama.generation import quantize as quantize_module
from llama.eval.agreement import agreement, chat_sequences, scored_logprobs
from llama.eval.datasets import kjv_genesis, mmlu_smoke
from llama.eval.scoring import prefix_token
from llama.generation import Llama
from llama.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import llamacpp_quantize, write_f32_gguf  # noqa: E402  (bench/generate.py)

OURS = [("int8", 32), ("int8", 64), ("int8", 0), ("int4", 32), ("int4", 64)]
LLAMACPP = [("F32", "LLAMA_FTYPE_ALL_F32"), ("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"),
            ("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"), ("Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1")]


def ours_logprobs(path, windows, quantize=None, group_size=None, kernel=False, head_4bit=False):
    """kernel=True: every row through the group-wise decode kernel (activations rounded to int8 per
    block), as decoding runs; otherwise a window's many rows take the prefill path (the weights
    dequantized, fp32 GEMM): the weights' error alone. head_4bit: the output projection in 4 bits
    too. `windows`: (tokens, first scored index) pairs; yields each one's scored log-probs."""
    head, quantize_module.HEAD_METHOD = quantize_module.HEAD_METHOD, (
        {**quantize_module.HEAD_METHOD, "int4": "int4"} if head_4bit else quantize_module.HEAD_METHOD)
    try:
        llama = Llama.build(path, max_seq_len=max(len(w) for w, _ in windows), max_batch_size=1,
                            quantize=quantize, group_size=group_size)
    finally:
        quantize_module.HEAD_METHOD = head
    for w in windows:
        prefill_rows, quantize_module.PREFILL_ROWS = quantize_module.PREFILL_ROWS, (1 << 30 if kernel else 0)
        try:
            yield scored_logprobs(llama.model, [w])  # (T - first, vocab)
        finally:
            quantize_module.PREFILL_ROWS = prefill_rows


def llamacpp_logprobs(path, windows, threads):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(len(w) for w, _ in windows), n_batch=512, n_ubatch=512,
                          logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
    for w, first in windows:
        llm.reset()
        llm.eval(w)
        yield torch.from_numpy(np.array(llm.scores[first - 1 : len(w) - 1], dtype=np.float32)).log_softmax(-1)


def compare(reference, logprobs, windows):
    """(top-1 agreement, mean KL(p || q), perplexity) of one engine against the fp32 log-probs."""
    agree = kl = nll = 0.0
    count = 0
    for p, q, (w, first) in zip(reference, logprobs, windows):
        top1, mean_kl = agreement(p, q)
        agree, kl = agree + top1 * len(p), kl + mean_kl * len(p)
        nll -= float(q.gather(-1, torch.tensor(w[first:])[:, None]).sum())
        count += len(w) - first
    return agree / count, kl / count, math.exp(nll / count)


def text_windows(tok, args):
    """KJV Genesis in disjoint windows, each starting with the tokenizer's prefix token; all scored."""
    text = tok.encode(kjv_genesis(50), bos=False, eos=False)[: args.tokens]
    step = args.window - 1  # each window: the prefix token, then the next window - 1 text tokens
    windows = [[prefix_token(tok)] + text[i : i + step] for i in range(0, len(text), step)]
    return [(w, 1) for w in windows if len(w) > 1], f"KJV Genesis, windows of <= {args.window}"


def chat_windows(src, args):
    """The first --chat mmlu-smoke questions as chat prompts, each with the fp32 model's greedy reply."""
    questions = [item["context"].split("Question: ", 1)[1].removesuffix("\nAnswer:") for item in mmlu_smoke()]
    fp32 = Llama.build(src, max_seq_len=1024, max_batch_size=1)
    return chat_sequences(fp32, questions[: args.chat], args.reply_len), \
        f"{args.chat} chat prompts (mmlu-smoke questions) with fp32's own replies of <= {args.reply_len} tokens"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=3072, help="text tokens scored (prefix tokens added per window)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["llamacpp"])
    p.add_argument("--chat", type=int, default=0, help="N chat prompts with the model's replies instead of the text")
    p.add_argument("--reply-len", type=int, default=48, help="--chat: tokens of each fp32 reply at most")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    src = assets.smollm2_gguf()
    start = time.perf_counter()
    windows, what = chat_windows(src, args) if args.chat else text_windows(load_tokenizer(src), args)
    reference = list(ours_logprobs(src, windows))
    engines = {("llama-ref", "fp32"): reference}
    for method, group in OURS:
        name = f"{method} group {group or 'row'}"
        engines[("llama-ref", name + (", weights" if group else ""))] = ours_logprobs(src, windows, method, group)
        if group:  # the decode kernel's numbers too (per row: torch's kernel, bf16 activations, weights only here)
            engines[("llama-ref", name + ", decode kernel")] = ours_logprobs(src, windows, method, group, kernel=True)
    if args.chat:  # the output projection in 4 bits too: int4 as it was before it kept 8 bits there
        for group in (32, 64):
            engines[("llama-ref", f"int4 group {group}, output int4 too, decode kernel")] = ours_logprobs(
                src, windows, "int4", group, kernel=True, head_4bit=True)
    if "llamacpp" not in args.skip:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp skipped: `pip install llama-cpp-python` to include it")
        else:
            f32 = write_f32_gguf(src, assets.cache_dir() / "smollm2-135m-instruct.f32.gguf")
            for name, ftype in LLAMACPP:
                path = assets.cache_dir() / f"smollm2-135m-instruct.llamacpp-{name}.gguf"
                engines[("llama.cpp", name)] = llamacpp_logprobs(llamacpp_quantize(f32, path, ftype, args.threads),
                                                                 windows, args.threads)
    scored = sum(len(w) - first for w, first in windows)
    print(f"SmolLM2-135M-Instruct: {scored} tokens teacher-forced; {what}; torch {torch.__version__}")
    print("\n| engine | weights | top-1 agreement with fp32 | mean KL(fp32 ‖ q), nats | perplexity |")
    print("|---|---|---|---|---|")
    for (engine, weights), logprobs in engines.items():
        agree, kl, ppl = compare(reference, logprobs, windows)
        print(f"| {engine} | {weights} | {100 * agree:.2f}% | {kl:.5f} | {ppl:.3f} |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
