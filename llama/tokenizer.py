"""Tokenizers: text <-> token ids for Llama 3 (tiktoken BPE), Llama 2 (sentencepiece) and the
default model SmolLM2 (GPT-2-style byte-level BPE, in llama/bpe.py).

    tok = load_tokenizer(path)          # tokenizer.model, tokenizer.json (or its dir), or a .gguf
    ids = tok.encode("Hi", bos=tok.add_bos, eos=False)
    tok.decode(ids); tok.stop_tokens; tok.chat_format.encode_dialog_prompt(dialog)
    stream = StreamDecoder(tok); text = stream.push(token_id) ... + stream.flush()

Every tokenizer has: encode(s, *, bos, eos), decode(ids), decode_bytes(ids, at_start=True), n_words,
bos_id, eos_id, pad_id, stop_tokens, add_bos (does the model expect BOS first?), special_tokens,
chat_format (see llama/chat.py). `Tokenizer` and `ChatFormat` are Meta's Llama 3 names.

    python -m llama.tokenizer train --input FILES --vocab-size N --out PATH   # see llama/bpe_train.py
    python -m llama.tokenizer encode --tokenizer PATH "some text"
"""

from __future__ import annotations

import argparse
import base64
import binascii
import codecs
import json
import re
import struct
import sys
from pathlib import Path

import tiktoken

from llama.bpe import LLAMA3_PATTERN
from llama.chat import ChatFormat, ChatMLFormat, Llama2ChatFormat
from llama.errors import USER_ERRORS, UserError, report
from llama.files import copy_file, write_text

__all__ = ["Tokenizer", "ChatFormat", "Llama2ChatFormat", "ChatMLFormat", "SentencePieceTokenizer",
           "ByteLevelBPETokenizer", "StreamDecoder", "TokenizerError", "load_tokenizer", "check_vocab",
           "train_bpe"]


class TokenizerError(UserError):
    """A tokenizer file is missing, corrupt or does not fit the model it is paired with."""


# Meta's limits (llama-models tokenizer.py): tiktoken panics on >400k chars, or on runs of more than
# ~25k consecutive whitespace or non-whitespace chars, so long text is cut into such slices first.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def load_tiktoken_bpe(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file (one `base64(token) rank` per line) -> {token bytes: rank}, checked."""
    try:
        lines = Path(path).read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found") from None
    except (UnicodeDecodeError, OSError) as e:
        raise TokenizerError(f"{path}: not a tiktoken BPE file ({e})") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}; "
                                 "the file is corrupt or not a tiktoken tokenizer.model") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be 0..{len(ranks) - 1} with no gaps or repeats")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} single bytes (e.g. {missing[0]:#04x}) have no token; "
                             "a byte-level BPE file needs all 256")
    return ranks


class Tokenizer:
    """Llama 3 tokenizer (Meta's name and API): tiktoken BPE + 256 special tokens after the ranks."""

    num_reserved_special_tokens = 256
    pat_str = LLAMA3_PATTERN  # Meta's name for the pre-tokenizer regex (defined once, in llama/bpe.py)
    add_bos = True  # Llama 3 always starts a sequence with <|begin_of_text|>

    def __init__(self, model_path):
        model_path = Path(model_path)
        mergeable_ranks = load_tiktoken_bpe(model_path)
        num_base_tokens = len(mergeable_ranks)
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                 "<|python_tag|>", "<|image|>"]
        names += [f"<|reserved_special_token_{2 + i}|>" for i in range(self.num_reserved_special_tokens - len(names))]
        self.special_tokens = {name: num_base_tokens + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(name=model_path.name, pat_str=self.pat_str,
                                       mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens)
        self.n_words = num_base_tokens + len(names)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = {self.eos_id, self.eom_id, self.eot_id}
        self.chat_format = ChatFormat(self)

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special=None, disallowed_special=()) -> list[int]:
        """Special-token text encodes as plain text unless named in `allowed_special` ("all" or a set)."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        allowed_special = allowed_special or set()
        ids = [self.bos_id] if bos else []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for part in split_long_runs(s[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                ids.extend(self.model.encode(part, allowed_special=allowed_special,
                                             disallowed_special=disallowed_special))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids) -> str:
        return self.model.decode(self._checked(ids))

    def decode_bytes(self, ids, at_start: bool = True) -> bytes:
        return self.model.decode_bytes(self._checked(ids))

    def _checked(self, ids) -> list[int]:
        ids = list(ids)
        bad = next((i for i in ids if not 0 <= i < self.n_words), None)
        if bad is not None:  # tiktoken would raise a bare KeyError / OverflowError
            raise ValueError(f"token id {bad} is out of range for a vocab of {self.n_words}")
        return ids


def split_long_runs(s: str, max_run: int):
    """Yield slices of `s` in which no run of whitespace or of non-whitespace exceeds `max_run` chars
    (Meta's `_split_whitespaces_or_nonwhitespaces`, written with a regex: same cut points)."""
    start = 0
    for m in re.finditer(r"\s+|\S+", s):
        # A run of length L is cut after every max_run chars, counted from the run's start.
        for cut in range(m.start() + max_run, m.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


# sentencepiece turns each byte of broken UTF-8 into its own U+FFFD; Python's "replace" gives one per
# maximal invalid sequence (as tiktoken and HF do). StreamDecoder uses the tokenizer's own rule.
codecs.register_error("replace_each_byte", lambda e: ("\ufffd" * (e.end - e.start), e.end))


class SentencePieceTokenizer:
    """Llama 2 tokenizer: a sentencepiece model (Meta's Llama 2 `Tokenizer` API)."""

    add_bos = True
    utf8_errors = "replace_each_byte"

    def __init__(self, model_path):
        import sentencepiece

        self.sp_model = sentencepiece.SentencePieceProcessor()
        try:
            self.sp_model.Load(str(model_path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{model_path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        sp = self.sp_model
        self.n_words, self.bos_id, self.eos_id, self.pad_id = sp.vocab_size(), sp.bos_id(), sp.eos_id(), sp.pad_id()
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.n_words) if sp.is_control(i)}
        self.stop_tokens = {self.eos_id}
        self.chat_format = Llama2ChatFormat(self)

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        ids = self.sp_model.encode(s)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp_model.decode(list(ids))

    def decode_bytes(self, ids, at_start: bool = True) -> bytes:
        """Bytes of `ids`; `at_start`: no text came before, so the first piece's "▁" (the dummy
        prefix sentencepiece adds when encoding) is dropped, as `decode` does."""
        sp, out = self.sp_model, bytearray()
        for i in ids:
            if sp.is_control(i):
                continue
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                out.append(int(piece[3:5], 16))  # "<0xE4>"
            elif sp.is_unknown(i):
                out += " \u2047 ".encode()
            else:
                out += (piece[1:] if at_start and piece.startswith("▁") else piece).replace("▁", " ").encode()
            at_start = False  # after the first non-control piece, even one that decoded to nothing
        return bytes(out)


class StreamDecoder:
    """Detokenize one token at a time for streaming output.

    `push(id)` returns the text that is now final (never half a UTF-8 character: an emoji split over
    several byte tokens appears once its last byte arrives); `flush()` returns the rest. The pieces
    join to exactly `tokenizer.decode(all_ids)`: bytes go through one incremental UTF-8 decoder,
    which gives the same result as decoding all bytes at once.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        errors = getattr(tokenizer, "utf8_errors", "replace")
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self._specials = set(tokenizer.special_tokens.values())
        self._at_start = True  # no text token yet (sentencepiece drops the first piece's "▁")

    def push(self, token_id: int) -> str:
        data = self.tokenizer.decode_bytes([token_id], at_start=self._at_start)
        self._at_start = self._at_start and token_id in self._specials
        if token_id in self._specials:
            # A special token ends any half-finished character (sentencepiece's controls decode to
            # nothing, yet still cut a run of byte pieces; for the others this changes nothing).
            return self._utf8.decode(data, final=True)
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


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


# Tokenizer names usable wherever a tokenizer path is asked for (fetched once, see llama/assets.py).
TOKENIZER_ASSETS = {"llama3": "llama3-tokenizer", "smollm2": "smollm2"}
HF_TOKENIZER_FILES = ["tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]


def tokenizer_file(value, flag: str = "tokenizer") -> Path:
    """The tokenizer file that `value` names: an asset name (llama3, smollm2), a tokenizer file, or a
    directory holding one (a checkpoint or a training run's out_dir). train.py, data prepare and the
    checkpoint loaders resolve tokenizers here. `flag` names the option in error messages."""
    from llama import assets

    if str(value) in TOKENIZER_ASSETS:
        return assets.fetch(TOKENIZER_ASSETS[str(value)])
    path = Path(value)
    if path.is_dir() and (path / "latest").is_file() and not (path / "params.json").exists():
        path = path / (path / "latest").read_text().strip()  # a training run: its newest checkpoint
    if path.is_dir():
        for candidate in [path / "tokenizer.model", path / "tokenizer.json", *sorted(path.glob("*.gguf"))[:1],
                          path.parent / "tokenizer.model"]:  # Meta's downloads keep it one folder up
            if candidate.is_symlink() or candidate.exists():
                return tokenizer_file(candidate, flag)
        raise TokenizerError(f"{value}: no tokenizer.model, tokenizer.json or .gguf file in this directory: "
                             f"pass the tokenizer file with {flag}")
    if path.is_symlink() and not path.exists():
        raise TokenizerError(f"{path} is a link to {path.readlink()}, which no longer exists: "
                             f"pass the tokenizer file with {flag}")
    if not path.exists():
        raise TokenizerError(f"{flag} {value} does not exist: give a tokenizer file, a checkpoint directory "
                             f"or one of {', '.join(TOKENIZER_ASSETS)}")
    return path


def save_tokenizer(source, directory) -> Path:
    """Write the tokenizer at `source` into `directory` under the names the loaders look for, as small
    self-contained files (never links): tokenizer.model for tiktoken/sentencepiece, tokenizer.json plus
    tokenizer_config.json / chat_template.jinja for HF tokenizers, and for a GGUF its tokenizer
    extracted into those HF files. Loading the copy gives the same ids and chat format."""
    from llama.bpe import gguf_to_hf_json
    from llama.gguf_io import GGUFFile

    source, directory = tokenizer_file(source), Path(directory)
    kind = _detect(source)
    if kind == "gguf":
        tok_json, config = gguf_to_hf_json(GGUFFile(source).metadata)
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
    from llama.bpe import ByteLevelBPETokenizer, load_hf_json
    from llama.gguf_io import GGUFFile

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
        meta = GGUFFile(file).metadata  # the header only; tensors stay unread in the memory map
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2', byte-level BPE); "
                             "pass the model's tokenizer.model instead")
        return ByteLevelBPETokenizer.from_gguf(meta, file)
    except (ValueError, KeyError, TypeError, struct.error, OSError) as e:
        if isinstance(e, TokenizerError):
            raise
        message = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise TokenizerError(message if str(path) in message else f"{path}: {message}") from None


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Raise TokenizerError if the tokenizer can produce ids the checkpoint has no embedding for."""
    if tokenizer.n_words > vocab_size:
        raise TokenizerError(
            f"the tokenizer has {tokenizer.n_words} tokens but the checkpoint's vocab_size is {vocab_size}: "
            f"ids up to {tokenizer.n_words - 1} would index past the embedding table. Pair the checkpoint "
            "with the tokenizer it was trained with (or train with vocab_size >= the tokenizer's n_words)")


def __getattr__(name):
    # Imported on first use: llama.bpe / llama.bpe_train import TokenizerError from this module.
    if name == "ByteLevelBPETokenizer":
        from llama.bpe import ByteLevelBPETokenizer

        return ByteLevelBPETokenizer
    if name == "train_bpe":
        from llama.bpe_train import train_bpe

        return train_bpe
    raise AttributeError(f"module 'llama.tokenizer' has no attribute {name!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a BPE tokenizer.model (tiktoken format) on your text")
    train.add_argument("--input", nargs="+", required=True, metavar="FILES", help="files or directories")
    train.add_argument("--vocab-size", type=int, required=True, help="total, including 256 special tokens")
    train.add_argument("--out", required=True, metavar="PATH")
    encode = sub.add_parser("encode", help="print the ids and pieces of some text")
    encode.add_argument("--tokenizer", required=True, metavar="PATH")
    encode.add_argument("text")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from llama.bpe_train import train_bpe

            for item in args.input:
                if not Path(item).exists():
                    raise TokenizerError(f"{item}: no such training file or directory")
            out = train_bpe([Path(p) for p in args.input], args.vocab_size, args.out, verbose=True)
            print(f"wrote {out}: {load_tokenizer(out).n_words} tokens including 256 special tokens")
        else:
            tok = load_tokenizer(args.tokenizer)
            try:
                ids = tok.encode(args.text, bos=tok.add_bos, eos=False)
            except ValueError as e:  # e.g. special-token text a byte-level BPE refuses
                raise TokenizerError(f"{args.tokenizer}: cannot encode this text: {e}") from None
            print(json.dumps({"ids": ids, "pieces": [tok.decode([i]) for i in ids]}, ensure_ascii=False))
    except USER_ERRORS as e:  # TokenizerError or a missing path: one line; anything else is a bug
        return report(e)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: llama.bpe_train raises
    # llama.tokenizer.TokenizerError, which a __main__.TokenizerError handler would not catch.
    from llama.tokenizer import main as _main

    sys.exit(_main())
