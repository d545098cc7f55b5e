"""Tokenizers: text <-> token ids for Llama 3 (tiktoken BPE), Llama 2 (sentencepiece) and the
default model SmolLM2 (GPT-2-style byte-level BPE, in llama/tokenizer/bpe.py).

    tok = load_tokenizer(path)          # tokenizer.model, tokenizer.json (or its dir), or a .gguf
    ids = encode_text(tok, "Hi")        # BOS first exactly when the tokenizer's own rule adds one
    tok.decode(ids); tok.stop_tokens; tok.chat_format.encode_dialog_prompt(dialog)
    stream = StreamDecoder(tok); text = stream.push(token_id) ... + stream.flush()

Every tokenizer has: encode(s, *, bos, eos), decode(ids), decode_bytes(ids, at_start=True), n_words,
bos_id, eos_id, pad_id, stop_tokens, add_bos (does the model expect BOS first?), special_tokens,
chat_format (see llama/tokenizer/chat.py). `Tokenizer` and `ChatFormat` are Meta's Llama 3 names.

    python -m llama.tokenizer train --input FILES --vocab-size N --out PATH   # see llama/tokenizer/train.py
    python -m llama.tokenizer encode --tokenizer PATH "some text"
"""

from __future__ import annotations

import argparse
import sys
import json
import re
import struct
from pathlib import Path

from llama.common.errors import USER_ERRORS, report
from llama.common.gguf_header import GGUFHeader
from llama.tokenizer.bpe import ByteLevelBPETokenizer, gguf_to_hf_json, load_hf_json
from llama.tokenizer.chat import ChatFormat, ChatMLFormat, Llama2ChatFormat
from llama.tokenizer.errors import TokenizerError
from llama.tokenizer.llama2 import SentencePieceTokenizer
from llama.tokenizer.llama3 import Tokenizer
from llama.tokenizer.paths import TOKENIZER_ASSETS, tokenizer_file
from llama.tokenizer.stream import StreamDecoder
from llama.tokenizer.train import train_bpe
from llama.common.files import add_output_argument, check_output_file, copy_file, write_text

__all__ = ["Tokenizer", "ChatFormat", "Llama2ChatFormat", "ChatMLFormat", "SentencePieceTokenizer",
           "ByteLevelBPETokenizer", "StreamDecoder", "TokenizerError", "load_tokenizer", "check_vocab",
           "train_bpe", "encode_text"]


def _detect(path: Path) -> str:
    """Which format a tokenizer path holds: 'gguf', 'hf', 'tiktoken' or 'sentencepiece'."""
    if path.is_dir():
        for name, kind in (("tokenizer.model", None), ("tokenizer.json", "hf")):
            if (path / name).exists():
                return kind or _detect(path / name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        raise TokenizerError(f"{path}: no tokenizer.model, tokenizer.json or single .gguf file in this directory")
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"GGUF"):
        return "gguf"
    if path.suffix == ".json" or head.lstrip().startswith(b"{"):
        return "hf"
    if re.match(rb"[A-Za-z0-9+/]+=* \d+(\r?\n|$)", head):
        return "tiktoken"
    return "sentencepiece"


HF_TOKENIZER_FILES = ["tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]


def save_tokenizer(source, directory) -> Path:
    """Write the tokenizer at `source` into `directory` under the names the loaders look for, as small
    self-contained files (never links): tokenizer.model for tiktoken/sentencepiece, tokenizer.json plus
    tokenizer_config.json / chat_template.jinja for HF tokenizers, and for a GGUF its tokenizer
    extracted into those HF files. Loading the copy gives the same ids and chat format."""

    source, directory = tokenizer_file(source), Path(directory)
    kind = _detect(source)
    if kind == "gguf":
        tok_json, config = gguf_to_hf_json(GGUFHeader(source).metadata)
        write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        return write_text(directory / "tokenizer.json", json.dumps(tok_json, ensure_ascii=False))
    if kind != "hf":
        return copy_file(source, directory / "tokenizer.model")
    for name in HF_TOKENIZER_FILES:  # where load_hf_json finds the BOS/EOS settings and chat template
        if (source.parent / name).is_file():
            copy_file(source.parent / name, directory / name)
    return copy_file(source, directory / "tokenizer.json")


def load_tokenizer(path):
    """The right tokenizer for `path`: a tiktoken tokenizer.model (Llama 3), a sentencepiece .model
    (Llama 2), an HF tokenizer.json or a directory holding one, or a .gguf file."""

    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"{path}: no such file or directory; pass a tokenizer.model, tokenizer.json, "
                             "a .gguf file, or a directory holding one")
    kind = _detect(path)
    if kind == "tiktoken":
        return Tokenizer(path / "tokenizer.model" if path.is_dir() else path)
    if kind == "sentencepiece":
        try:
            return SentencePieceTokenizer(path / "tokenizer.model" if path.is_dir() else path)
        except TokenizerError:
            raise TokenizerError(f"{path}: not a tokenizer file: expected a tiktoken BPE file (Llama 3), a "
                                 "sentencepiece model (Llama 2), an HF tokenizer.json or a GGUF file") from None
    try:
        if kind == "hf":
            return ByteLevelBPETokenizer.from_hf_json(*load_hf_json(path), path)
        file = sorted(path.glob("*.gguf"))[0] if path.is_dir() else path
        meta = GGUFHeader(file).metadata  # tensors stay unread in the memory map
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2', byte-level BPE); "
                             "pass the model's tokenizer.model instead")
        return ByteLevelBPETokenizer.from_gguf(meta, file)
    except (ValueError, KeyError, TypeError, struct.error, OSError) as e:
        if isinstance(e, TokenizerError):
            raise
        message = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        if isinstance(e, json.JSONDecodeError):  # a text or other JSON file given as the tokenizer
            message = (f"not a tokenizer: not valid JSON ({e.msg}, line {e.lineno}); expected a tokenizer.model, "
                       f"an HF tokenizer.json or a .gguf file")
        raise TokenizerError(message if str(path) in message else f"{path}: {message}") from None


def encode_text(tokenizer, text: str) -> list[int]:
    """`text` as the model's own tokenizer encodes it: BOS first exactly when the tokenizer adds one
    (`add_bos`: Llama 3 and Llama 2 yes; an HF tokenizer.json by its tokenizer_config add_bos_token,
    else its post-processor; a GGUF by tokenizer.ggml.add_bos_token: SmolLM2 no), never EOS. Prompts,
    perplexity and lm-eval's contexts all take their BOS from here, as HF's `tokenizer(text)` and
    llama.cpp's tokenize(add_special=true) do; a tokenizer object without `add_bos` gets Meta's BOS."""
    return tokenizer.encode(text, bos=getattr(tokenizer, "add_bos", True), eos=False)


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Raise TokenizerError if the tokenizer can produce ids the checkpoint has no embedding for."""
    if tokenizer.n_words > vocab_size:
        raise TokenizerError(
            f"the tokenizer has {tokenizer.n_words} tokens but the checkpoint's vocab_size is {vocab_size}: "
            f"ids up to {tokenizer.n_words - 1} would index past the embedding table. Pair the checkpoint "
            "with the tokenizer it was trained with (or train with vocab_size >= the tokenizer's n_words)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.tokenizer", description="Train a BPE tokenizer on your text, or look at the ids of some text.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a BPE tokenizer.model (tiktoken format) on your text")
    train.add_argument("--input", nargs="+", required=True, metavar="FILES", help="files or directories")
    train.add_argument("--vocab-size", type=int, required=True, help="total, including 256 special tokens")
    add_output_argument(train, "--out", kind="file", required=True, metavar="PATH", help="the tokenizer.model to write")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out file (never an input)")
    encode = sub.add_parser("encode", help="print the ids and pieces of some text")
    encode.add_argument("--tokenizer", required=True, metavar="PATH")
    encode.add_argument("text")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":

            for item in args.input:
                if not Path(item).exists():
                    raise TokenizerError(f"{item}: no such training file or directory")
            check_output_file(args.out, args.overwrite, args.input, "--out")
            out = train_bpe([Path(p) for p in args.input], args.vocab_size, args.out, verbose=True)
            print(f"wrote {out}: {load_tokenizer(out).n_words} tokens including 256 special tokens")
        else:
            tok = load_tokenizer(args.tokenizer)
            try:
                ids = encode_text(tok, args.text)
            except ValueError as e:  # e.g. special-token text a byte-level BPE refuses
                raise TokenizerError(f"{args.tokenizer}: cannot encode this text: {e}") from None
            print(json.dumps({"ids": ids, "pieces": [tok.decode([i]) for i in ids]}, ensure_ascii=False))
    except USER_ERRORS as e:  # TokenizerError or a missing path: one line; anything else is a bug
        return report(e)
    return 0

