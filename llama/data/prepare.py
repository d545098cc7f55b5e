"""Training data: tokenize once into uint32 shards, then read batches through memmap.

    python -m llama.data prepare corpus/ notes.txt more.jsonl --tokenizer tokenizer.model --out data/mine
    python -m llama.data prepare chats.jsonl --sft --tokenizer tokenizer.model --out data/chat
    python -m llama.data prepare prefs.jsonl --pairs --tokenizer smollm2 --out data/prefs  # DPO (pairs.py)
    python -m llama.data prepare stdlib --vocab-size 2048 --out data/stdlib   # BPE trained on the corpus

A prepared directory holds `tokens_NNN.bin` (one logical uint32 stream cut into shards), for SFT
`mask_NNN.bin` (uint8: 1 where the token is a training target), `offsets.npy` (where each document or
dialog starts: packing masks attention at these boundaries) and `meta.json` (counts, the tokenizer's identity, where the validation split begins).
Pretraining documents are encoded as BOS text EOS and concatenated; the last `val_fraction` of the
stream is held out. SFT dialogs are kept whole (one dialog per sequence) and the last
`val_fraction` of them are held out.

Reading: llama/train/batches.py.
"""

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from llama.common.errors import USER_ERRORS, report
from llama.common.files import InputFileError, add_output_argument, atomic_dir, read_text_file, write_text
from llama.data.records import (DataError, check_dialog, common_prefix, dialog_frame,  # noqa: F401 (names kept here)
                                 encode_dialog, jsonl_records)
from llama.data.pairs import encode_pair, iter_pairs

META = "meta.json"
FORMAT = "llama-ref tokens v1"
SHARD_TOKENS = 1 << 28  # 1 GiB of uint32 per shard file
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".c", ".h", ".js", ".json", ""}


# ---------------------------------------------------------------------------- inputs


def stdlib_files() -> List[Path]:
    """The default corpus: the running interpreter's standard library source (~4.7 MB on 3.11).
    Real text present on every machine, no download."""
    return sorted(Path(os.__file__).parent.glob("*.py"))


def collect_files(inputs: Iterable[str]) -> List[Path]:
    """Expand directories (recursively: text files and .jsonl) into a sorted list of files."""
    files: List[Path] = []
    for item in inputs:
        if item == "stdlib":
            files.extend(stdlib_files())
            continue
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts)
                and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl"))
            if not found:
                raise DataError(f"directory {p} has no text or .jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"data {p} does not exist")
    if not files:
        raise DataError("no data files given")
    return files


def iter_documents(files: List[Path], sft: bool) -> Iterator[object]:
    """Text documents (one per text file, one per jsonl line's "text"), or for SFT each
    jsonl line's "messages" list."""
    for f in files:
        if f.suffix != ".jsonl":
            if sft:
                raise DataError(f"{f}: SFT data must be .jsonl lines of {{\"messages\": [...]}}")
            try:
                yield read_text_file(f, "data")
            except InputFileError as e:  # a corpus folder may hold other files: say so, and go on
                print(f"skipping {e}", file=sys.stderr)
            continue
        for n, record in jsonl_records(f):
            key = "messages" if sft else "text"
            if not isinstance(record, dict) or key not in record:
                raise DataError(f"{f}:{n} has no {key!r} field (expected {{\"{key}\": ...}} per line)")
            if sft:
                check_dialog(record[key], f"{f}:{n}")
            elif not isinstance(record[key], str):
                raise DataError(f"{f}:{n}: 'text' is a {type(record[key]).__name__} ({str(record[key])[:40]}), "
                                f"not a string: write {{\"text\": \"...\"}}")
            yield record[key]


# ---------------------------------------------------------------------------- writing


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _ShardWriter:
    """Appends to `{prefix}_NNN.bin`, opening a new file every SHARD_TOKENS elements."""

    def __init__(self, root: Path, prefix: str, dtype):
        self.root, self.prefix, self.dtype = root, prefix, dtype
        self.shards: List[dict] = []
        self.file = None

    def write(self, values) -> None:
        array = np.asarray(values, dtype=self.dtype)
        while array.size:
            if self.file is None or self.shards[-1]["tokens"] == SHARD_TOKENS:
                self.close()
                name = f"{self.prefix}_{len(self.shards):03d}.bin"
                self.file = open(self.root / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
            room = SHARD_TOKENS - self.shards[-1]["tokens"]
            self.file.write(array[:room].tobytes())
            self.shards[-1]["tokens"] += min(room, array.size)
            array = array[room:]

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


def prepare(inputs: List[str], out_dir, tokenizer_path=None, *, sft: bool = False, val_fraction: float = 0.02,
            vocab_size: int = 2048, overwrite: bool = False, pairs: bool = False) -> Path:
    """Tokenize `inputs` into `out_dir` with the tokenizer at `tokenizer_path` (None: train a BPE of
    `vocab_size` tokens on the inputs, kept as out_dir/tokenizer.model). The directory is built under
    a temporary name and renamed at the end (llama/common/files.py): an error or Ctrl-C leaves no half
    directory and the previous one as it was. An existing non-empty out_dir is refused unless
    `overwrite` (and even then never an input, the working directory or a parent of either).
    `sft`: chat jsonl, trained on the replies; `pairs`: preference pairs (llama/data/pairs.py)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = collect_files(inputs)
    if sft and pairs:
        raise DataError("give one of sft and pairs: chat jsonl for SFT, or preference pairs for DPO")
    if tokenizer_path is None and (sft or pairs):
        raise DataError(f"{'SFT data' if sft else 'Preference pairs'} need the chat model's tokenizer: give --tokenizer")
    out = Path(out_dir)
    with atomic_dir(out, overwrite, [i for i in inputs if i != "stdlib"] + [tokenizer_path], name="--out") as tmp:
        if tokenizer_path is None:  # the trained BPE lives with the data it tokenized
            tokenizer_path = train_tokenizer(inputs, vocab_size, tmp / "tokenizer.model")
            final_tokenizer = out.resolve() / "tokenizer.model"
        else:
            final_tokenizer = Path(tokenizer_path)
        meta = _tokenize_into(tmp, files, tokenizer_path, "pairs" if pairs else "sft" if sft else "pretrain",
                              val_fraction)
        meta.update(tokenizer=tokenizer_identity(final_tokenizer, tokenizer_path, meta.pop("n_words")),
                    sources=[str(i) for i in inputs])
        write_text(tmp / META, json.dumps(meta, indent=1))
    return out


def _sequences(files: List[Path], tokenizer, kind: str, origins: list) -> Iterator[Tuple[List[int], Optional[list]]]:
    """(token ids, 0/1 train mask or None for all) of each sequence: a text document (BOS text EOS), an
    SFT dialog, or the two sequences of a preference pair (prompt + chosen, prompt + rejected; the
    pair's file, line and prompt length go to `origins`)."""
    if kind == "pairs":
        for file_index, line, pair in iter_pairs(files):
            prompt, chosen, rejected = encode_pair(tokenizer, *pair)
            origins.append((file_index, line, len(prompt)))
            for reply in (chosen, rejected):
                yield prompt + reply, [0] * len(prompt) + [1] * len(reply)
        return
    for doc in iter_documents(files, kind == "sft"):
        if kind == "sft":
            yield encode_dialog(tokenizer, doc)
        elif doc.strip():
            yield tokenizer.encode(doc, bos=True, eos=True), None


def _tokenize_into(tmp: Path, files: List[Path], tokenizer_path, kind: str, val_fraction: float) -> dict:
    """Write the shards into `tmp`; returns meta.json's counts and split."""
    from llama.tokenizer import load_tokenizer

    # A fixed shuffle of the files, so the held-out tail is a sample of the corpus, not its last
    # directory (the lines of a jsonl file keep their order).
    files = list(files)
    random.Random(0).shuffle(files)
    tokenizer = load_tokenizer(str(tokenizer_path))
    tokens, masks, starts = _ShardWriter(tmp, "tokens", np.uint32), _ShardWriter(tmp, "mask", np.uint8), [0]
    origins: list = []
    try:
        for ids, mask in _sequences(files, tokenizer, kind, origins):
            if mask is not None:
                masks.write(mask)
            tokens.write(ids)
            starts.append(starts[-1] + len(ids))
    finally:
        tokens.close(), masks.close()
    n_docs, n_tokens = len(starts) - 1, starts[-1]
    if n_tokens == 0:
        raise DataError(f"data {', '.join(sorted({str(f) for f in files}))[:200]} holds no text: nothing to train on")
    meta = {"format": FORMAT, "kind": kind, "n_tokens": n_tokens, "n_documents": n_docs,
            "shards": tokens.shards, "n_words": tokenizer.n_words}
    np.save(tmp / "offsets.npy", np.asarray(starts, dtype=np.int64))  # where each document starts (+ the end)
    if kind == "pretrain":
        meta.update(val_start=n_tokens - int(np.ceil(n_tokens * val_fraction)))
        return meta
    per_item = 2 if kind == "pairs" else 1  # a pair is two sequences, held out together
    n_items = n_docs // per_item
    n_val = int(np.ceil(n_items * val_fraction)) if n_items > 1 else 0
    meta.update(mask_shards=masks.shards, val_document_start=per_item * (n_items - n_val))
    if kind == "pairs":
        np.save(tmp / "origins.npy", np.asarray(origins, dtype=np.int64))  # (pairs, 3): file, line, prompt length
        meta.update(n_pairs=n_items, files=[str(f) for f in files])
    return meta


def tokenizer_identity(path, contents, n_words: int) -> dict:
    """meta.json's record of the tokenizer: where it will be (`path`), and the hash of its `contents`."""
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(contents), "n_words": n_words}


# A text in several scripts, digits, code and whitespace runs: two different tokenizers give it
# different ids (or vocabulary sizes), the same tokenizer in two file formats the same ones.
PROBE = ("The 3 quick brown foxes jumped over 1,024 lazy dogs; naïve café façade, Ünïcödé. "
         "def f(x):\n    return x ** 2  # tabs\tand  spaces   \n\n"
         "Съешь же ещё этих мягких французских булок. 我能吞下玻璃而不伤身体。 ❤️🦙 0.5e-3")


def same_tokenizer(a, b) -> bool:
    """Do tokenizer files `a` and `b` give the same ids: the same bytes, or the same tokenizer in two
    formats (the same vocabulary size, BOS, EOS and ids for PROBE)."""
    from llama.tokenizer import load_tokenizer

    if file_sha256(a) == file_sha256(b):
        return True
    ours, theirs = load_tokenizer(str(a)), load_tokenizer(str(b))
    same = [(t.n_words, t.bos_id, t.eos_id, t.encode(PROBE, bos=False, eos=False)) for t in (ours, theirs)]
    return same[0] == same[1]


def check_tokenizer(data_dir, meta: dict, tokenizer_path) -> None:
    """The data in `data_dir` holds the ids of the tokenizer its meta.json records: refuse to train it
    with any other (its ids would stand for other text, and the checkpoint would carry the wrong
    tokenizer). The same bytes (sha256) pass; other bytes pass only as the same tokenizer in another
    format (the tokenizer of a .gguf and its tokenizer.json): the same vocabulary size, BOS and EOS,
    and the same ids for a probe text. A tokenizer file changed since the data was prepared fails."""
    recorded = meta["tokenizer"]
    if file_sha256(tokenizer_path) == recorded["sha256"]:
        return
    fix = (f"prepare it again with this tokenizer (python -m llama.data prepare ... --tokenizer {tokenizer_path}), "
           f"or train with the one it was prepared with")
    original = Path(recorded["path"])
    if not original.is_file() or file_sha256(original) != recorded["sha256"]:
        raise DataError(f"{data_dir} was tokenized by {original} (sha256 {recorded['sha256'][:12]}), which "
                        f"{'has changed since' if original.is_file() else 'no longer exists'}, and "
                        f"{tokenizer_path} is another file: {fix}")
    if not same_tokenizer(tokenizer_path, original):
        raise DataError(f"{data_dir} was tokenized by {original}, not by {tokenizer_path} (another tokenizer: "
                        f"its ids stand for other text): {fix}")


def read_meta(root) -> dict:
    path = Path(root) / META
    if not path.is_file():
        raise DataError(f"{root} is not a prepared data directory (no {META}): run `python -m llama.data prepare`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}: prepare it again")
    if meta["n_tokens"] == 0:
        raise DataError(f"{root} holds no tokens: nothing to train on")
    return meta


# ---------------------------------------------------------------------------- default corpus and caching


def train_tokenizer(inputs: List[str], vocab_size: int, out_path) -> Path:
    """A byte-level BPE trained on the inputs' text (llama.tokenizer.train_bpe), written atomically."""
    from llama.tokenizer import train_bpe

    files = [f for f in collect_files(inputs) if f.suffix != ".jsonl"]
    if not files:
        raise DataError("training a tokenizer needs plain text files; give tokenizer= for jsonl data")
    return train_bpe([str(f) for f in files], vocab_size, str(out_path))


def _inputs_hash(inputs: List[str]) -> "hashlib._Hash":
    h = hashlib.sha256()
    for f in collect_files(inputs):
        stat = f.stat()
        h.update(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h


def cached_prepare(inputs: List[str], cache_root, tokenizer_path, *, sft: bool, val_fraction: float,
                   pairs: bool = False) -> Path:
    """prepare() into a cache directory named by what went in (files, sizes, mtimes, tokenizer,
    options): the first run tokenizes, later runs with the same inputs reuse it."""
    h = _inputs_hash(inputs)
    h.update(f"{file_sha256(tokenizer_path)}:{sft}:{pairs}:{val_fraction}:{FORMAT}:offsets".encode())  # with offsets.npy
    out = Path(cache_root) / f"{'pairs' if pairs else 'sft' if sft else 'text'}-{h.hexdigest()[:16]}"
    if not (out / META).is_file():
        prepare(inputs, out, tokenizer_path, sft=sft, val_fraction=val_fraction, pairs=pairs)
    return out


def bpe_dataset(inputs: List[str], cache_root, vocab_size: int, val_fraction: float) -> Tuple[Path, Path]:
    """Raw text with no tokenizer given (the default corpus, "stdlib", among them): train a BPE on
    it and tokenize, once. Returns (data dir, tokenizer path), both under cache_root."""
    name = "stdlib" if inputs == ["stdlib"] else _inputs_hash(inputs).hexdigest()[:16]
    root = Path(cache_root) / f"{name}-bpe{vocab_size}"
    tok = root / "tokenizer.model"
    if not tok.is_file():
        train_tokenizer(inputs, vocab_size, tok)
    return cached_prepare(inputs, root, tok, sft=False, val_fraction=val_fraction), tok


# ---------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text/jsonl files or directories into shards")
    p.add_argument("inputs", nargs="+", help="files, directories, or 'stdlib' (this Python's standard library)")
    add_output_argument(p, "--out", kind="dir", required=True, help="output directory (a new or empty one, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out directory (never an input, nor the working directory)")
    p.add_argument("--tokenizer", help="tokenizer file, checkpoint directory or 'llama3'; "
                                       "omitted: train a BPE on the inputs")
    p.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of the trained BPE")
    p.add_argument("--sft", action="store_true", help="inputs are chat jsonl ({\"messages\": [...]})")
    p.add_argument("--pairs", action="store_true", help="inputs are preference pairs for DPO "
                   "({\"prompt\" or \"messages\", \"chosen\", \"rejected\"}, llama/data/pairs.py)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="held-out share, in [0, 1)")
    args = parser.parse_args(argv)
    try:
        tok = None
        if args.tokenizer is not None:
            from llama.tokenizer import tokenizer_file

            tok = tokenizer_file(args.tokenizer, flag="--tokenizer")
        elif args.sft or args.pairs:
            raise DataError(f"{'--sft' if args.sft else '--pairs'} needs --tokenizer (the chat model's tokenizer)")
        out = prepare(args.inputs, args.out, tok, sft=args.sft, pairs=args.pairs, val_fraction=args.val_fraction,
                      vocab_size=args.vocab_size, overwrite=args.overwrite)
        if tok is None:
            print(f"trained a {args.vocab_size}-token BPE: {out / 'tokenizer.model'}")
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} is as it was before", file=sys.stderr)
        return 130
    except USER_ERRORS as e:  # DataError, TokenizerError, a missing path: one line; else a bug's traceback
        return report(e)
    meta = read_meta(out)
    print(f"{out}: {meta['n_documents']} documents, {meta['n_tokens']:,} tokens ({meta['kind']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
