"""Benchmark: train a 4k byte-level BPE on ~10 MB of Python's stdlib source, ours vs HF `tokenizers`.

    flock /tmp/llama-bench.lock python bench/tokenizer_train.py [--mb 10] [--vocab-size 4096]

Both trainers see the same files, the same Llama 3 split pattern and the same number of BPE tokens
(vocab_size - 256; our file gets Meta's 256 specials on load). Reported: wall time to train, and the
compression of the result (UTF-8 bytes per token) on held-out stdlib test files. HF `tokenizers` is
Rust and multi-threaded; ours is one Python process.
"""

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

from llama.tokenizer.train import count_chunks, learn_merges, write_tiktoken_bpe
from llama.tokenizer import Tokenizer


def stdlib_files(limit_bytes: int, tests: bool) -> list[Path]:
    """Sorted stdlib .py files (tests only, or no tests), up to `limit_bytes` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or ("test" in rel.split("/")[0]) != tests:
            continue
        files.append(path)
        total += path.stat().st_size
        if total >= limit_bytes:
            break
    return files


def train_hf(files, n_bpe_tokens):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(Tokenizer.pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(f) for f in files], trainer)
    return tok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=10.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    files = stdlib_files(int(args.mb * 1e6), tests=False)
    held_out = "".join(p.read_text(errors="replace") for p in stdlib_files(2_000_000, tests=True))
    size = sum(f.stat().st_size for f in files)
    n_bpe = args.vocab_size - Tokenizer.num_reserved_special_tokens
    print(f"corpus: {len(files)} stdlib files, {size / 1e6:.1f} MB; {n_bpe} BPE tokens + 256 specials")

    start = time.perf_counter()
    counts = count_chunks(files)
    counted = time.perf_counter()
    tokens = learn_merges(counts, n_bpe)
    ours = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(write_tiktoken_bpe(tokens, Path(tmp) / "tokenizer.model"))
        ours_tokens = len(tok.encode(held_out, bos=False, eos=False))
    print(f"ours: {ours:.1f} s ({counted - start:.1f} s counting {len(counts)} distinct chunks, "
          f"{ours - (counted - start):.1f} s merging); n_words {tok.n_words}")

    try:
        start = time.perf_counter()
        hf = train_hf(files, n_bpe)
        hf_time = time.perf_counter() - start
        hf_tokens = len(hf.encode(held_out).ids)
        print(f"HF tokenizers: {hf_time:.1f} s; vocab {hf.get_vocab_size()}")
    except ImportError:
        hf_time = hf_tokens = None
        print("HF tokenizers not installed: no peer column")

    n_bytes = len(held_out.encode())
    print("\n| trainer | train time | held-out bytes/token |\n|---|---|---|")
    print(f"| llama-ref `train_bpe` (Python, 1 process) | {ours:.1f} s | {n_bytes / ours_tokens:.2f} |")
    if hf_time is not None:
        print(f"| HF `tokenizers` BpeTrainer (Rust) | {hf_time:.1f} s | {n_bytes / hf_tokens:.2f} |")


if __name__ == "__main__":
    main()
