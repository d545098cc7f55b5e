"""Llama 3's tokenizer: tiktoken BPE over Meta's tokenizer.model, with Meta's special tokens."""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import tiktoken

from llama.tokenizer.bpe import LLAMA3_PATTERN
from llama.tokenizer.chat import ChatFormat
from llama.tokenizer.errors import TokenizerError


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
    pat_str = LLAMA3_PATTERN  # Meta's name for the pre-tokenizer regex (defined once, in llama/tokenizer/bpe.py)
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
