"""Train a byte-level BPE tokenizer on your own text, in Meta's tokenizer.model (tiktoken) format.

    python -m llama.tokenizer train --input data/ more.txt --vocab-size 4096 --out tokenizer.model
    Tokenizer("tokenizer.model")        # Meta's class loads it; so does load_tokenizer

The algorithm (Sennrich et al. 2016, byte-level as in GPT-2):
1. Cut the text into chunks with Llama 3's split pattern and count each distinct chunk once. Merges
   never cross a chunk boundary, so the corpus is just {chunk: count} (Python's stdlib: ~10 MB of
   text -> a few hundred thousand distinct chunks).
2. Every chunk starts as its UTF-8 bytes (ids 0..255). Count adjacent pairs, weighted by chunk count.
3. Repeat: merge the most frequent pair (ties: the smallest ids) into a new token; only the chunks
   that contain it are rewritten, and only their pair counts change (a heap with lazy deletion finds
   the next best pair), so one merge costs what it touches, not the whole corpus.

Vocab size: `vocab_size` counts the 256 special tokens that `Tokenizer` appends after the ranks
(Meta's scheme: <|begin_of_text|>, <|eot_id|>, ... so Llama 3's ChatFormat works unchanged). The file
holds vocab_size - 256 ranks: 256 single bytes, then one token per merge in merge order.
"""

from __future__ import annotations

import base64
import heapq
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex

from llama.common.files import write_bytes
from llama.tokenizer.errors import TokenizerError
from llama.tokenizer.llama3 import Tokenizer

NUM_SPECIAL = Tokenizer.num_reserved_special_tokens  # appended by Tokenizer after the ranks


def iter_texts(files_or_texts):
    """Paths (files, or directories: every file below, sorted) are read; a str naming an existing path
    is a path, any other str containing whitespace is the text itself (one with no whitespace is taken
    for a mistyped path). Undecodable bytes survive as surrogates (`surrogateescape`) and become their
    original bytes again. A binary file (a NUL byte) named directly is refused; one found inside a
    directory is skipped (a corpus folder may hold images or archives)."""
    for item in files_or_texts:
        is_text = isinstance(item, str) and any(c.isspace() for c in item) and not _exists(item)
        if is_text:
            yield item
            continue
        path = Path(item)
        if not path.exists():
            raise TokenizerError(f"{path}: no such training file or directory")
        for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            data = file.read_bytes()
            nul = data.find(b"\0")
            if nul >= 0:
                if file == path:
                    raise TokenizerError(f"{file} looks binary (a NUL byte at offset {nul}): train on text files")
                continue
            yield data.decode("utf-8", errors="surrogateescape")
def _exists(name: str) -> bool:
    try:
        return "\n" not in name and Path(name).exists()
    except (OSError, ValueError):  # too long for a file name, NUL bytes, ...
        return False


def count_chunks(files_or_texts, pattern: str = Tokenizer.pat_str) -> Counter:
    """{chunk: occurrences} over all texts, chunks cut by the (Llama 3) split pattern."""
    split = regex.compile(pattern)
    counts: Counter = Counter()
    for text in iter_texts(files_or_texts):
        counts.update(split.findall(text))
    return counts


def learn_merges(chunk_counts: Counter, n_ranks: int, log=None) -> list[bytes]:
    """Tokens (as bytes) in rank order: 256 single bytes, then merges until there are `n_ranks`."""
    words = [list(chunk.encode("utf-8", errors="surrogateescape")) for chunk in chunk_counts]
    freq = list(chunk_counts.values())
    tokens = [bytes([b]) for b in range(256)]  # id -> bytes; ids are ranks
    token_id = {t: i for i, t in enumerate(tokens)}
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that (may) hold it
    for w, (word, f) in enumerate(zip(words, freq)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += f
            where[pair].add(w)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    start = time.time()
    while len(tokens) < n_ranks and heap:
        neg, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count <= 0:
            continue
        if count != -neg:  # stale entry: the count dropped since it was pushed
            heapq.heappush(heap, (-count, a, b))
            continue
        merged = tokens[a] + tokens[b]
        if merged not in token_id:  # the same bytes can arise from two different pairs
            token_id[merged] = len(tokens)
            tokens.append(merged)
        changed = merge_pair(words, freq, where.pop((a, b), ()), (a, b), token_id[merged], pair_counts, where)
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], *pair))
        if log and len(tokens) % 500 == 0:
            log(f"{len(tokens)}/{n_ranks} tokens, {time.time() - start:.0f}s")
    return tokens


def merge_pair(words, freq, word_ids, pair, new_id, pair_counts, where) -> set:
    """Rewrite the words holding `pair` with `new_id`, updating pair counts; returns the pairs whose
    count went up (the new ones, to push on the heap)."""
    a, b = pair
    grown = set()
    for w in word_ids:
        word, f = words[w], freq[w]
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                out.append(new_id)
                i += 2
            else:
                out.append(word[i])
                i += 1
        if len(out) == len(word):
            continue  # stale index entry: this word no longer holds the pair
        for p in zip(word, word[1:]):
            pair_counts[p] -= f
        for p in zip(out, out[1:]):
            pair_counts[p] += f
            where[p].add(w)
            if new_id in p:
                grown.add(p)
        words[w] = out
    pair_counts.pop(pair, None)
    return grown


def write_tiktoken_bpe(tokens: list[bytes], out_path) -> Path:
    """One `base64(token) rank` line per token, like Meta's tokenizer.model; written atomically."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(tokens))
    return write_bytes(out_path, text.encode("ascii"))


def train_bpe(files_or_texts, vocab_size: int, out_path, *, verbose: bool = False) -> Path:
    """Train on files/directories/strings and write a tokenizer.model with `vocab_size` tokens in all
    (vocab_size - 256 BPE ranks + the 256 specials Tokenizer adds). Returns the written path."""
    if vocab_size < 256 + NUM_SPECIAL:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: it must be at least {256 + NUM_SPECIAL} "
                             f"(256 single-byte tokens + {NUM_SPECIAL} special tokens)")
    log = (lambda msg: print(msg, file=sys.stderr)) if verbose else None
    counts = count_chunks(files_or_texts)
    if not counts:
        names = ", ".join(str(f) for f in files_or_texts)
        raise TokenizerError(f"{names[:200]}: no text to train on: give files (or directories) with text in them")
    if log:
        log(f"{len(counts)} distinct chunks, {sum(counts.values())} in all")
    tokens = learn_merges(counts, vocab_size - NUM_SPECIAL, log)
    if len(tokens) < vocab_size - NUM_SPECIAL:
        print(f"warning: the text only supports {len(tokens)} BPE tokens (every chunk is a single token), "
              f"so the vocabulary has {len(tokens) + NUM_SPECIAL} tokens, not {vocab_size}", file=sys.stderr)
    return write_tiktoken_bpe(tokens, out_path)
