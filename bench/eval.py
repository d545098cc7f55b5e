"""Perplexity speed, side by side in one run: llama-ref's batched strided scorer vs HF transformers'
strided loop (its perplexity guide: one window per forward, loss over every position of the window).

    flock /tmp/llama-bench.lock python bench/eval.py                 # docs/evaluation.md's numbers
    python bench/eval.py --tokens 4096 --max-length 512 --stride 256 --batch-size 8

Setup: SmolLM2-135M-Instruct from llama.common.assets (the same GGUF for both, fp32), the text is the
default prose set (KJV Genesis, llama.eval.datasets) cut to --tokens tokens, the same token ids for both.
tokens/s = tokens scored / seconds of scoring (loading excluded). Each engine runs --repeat times
and keeps its best time (the machine is shared); the two runs alternate, so load hits both alike.
The perplexities must agree (printed): a fast wrong scorer is no use.
"""

import argparse
import math
import time
import warnings

import torch

from llama.common import assets
from llama.checkpoint import load_model
from llama.eval.datasets import kjv_genesis
from llama.eval.perplexity import perplexity_of_tokens
from llama.tokenizer import encode_text, load_tokenizer


def hf_strided(model, ids, max_length, stride):
    """HF's guide loop; returns (total nll, tokens scored)."""
    ids = torch.tensor([ids])
    n, nll, count, prev_end = ids.shape[1], 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        valid = int((target_ids[:, 1:] != -100).sum())
        if valid:
            with torch.no_grad():
                nll += float(model(input_ids, labels=target_ids).loss) * valid
            count += valid
        prev_end = end
        if end == n:
            break
    return nll, count


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    gguf = assets.smollm2_gguf()
    tok = load_tokenizer(gguf)
    ids = encode_text(tok, kjv_genesis(50))[: args.tokens]  # the tokenizer's own rule, as HF's tokenizer(text)
    ours = load_model(gguf, max_seq_len=args.max_length, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                               dtype=torch.float32).eval()
    best = {"llama-ref": math.inf, "hf": math.inf}
    for _ in range(args.repeat):
        start = time.perf_counter()
        res = perplexity_of_tokens(ours, ids, 1, args.max_length, args.stride, args.batch_size)
        best["llama-ref"] = min(best["llama-ref"], time.perf_counter() - start)
        start = time.perf_counter()
        hf_nll, hf_count = hf_strided(hf, ids, args.max_length, args.stride)
        best["hf"] = min(best["hf"], time.perf_counter() - start)
    print(f"SmolLM2-135M fp32, {len(ids)} tokens, max_length {args.max_length}, stride {args.stride}, "
          f"batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"{'engine':<12}{'perplexity':>12}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    for name, nll, count in [("llama-ref", res.nll, res.tokens), ("hf", hf_nll, hf_count)]:
        print(f"{name:<12}{math.exp(nll / count):>12.4f}{count:>8}{best[name]:>10.2f}{count / best[name]:>10.1f}")
    print(f"speed-up: {best['hf'] / best['llama-ref']:.2f}x HF")


if __name__ == "__main__":
    main()
