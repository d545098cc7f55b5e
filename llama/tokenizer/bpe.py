"""GPT-2-style byte-level BPE, as used by SmolLM2 (the default model) and stored in GGUF / tokenizer.json.

How it turns text into ids:
1. Split out special tokens (only where the caller allows them; see `encode`).
2. Pre-tokenize: regexes cut the text into words. GPT-2's pattern keeps a leading space on each word;
   SmolLM2 first isolates every digit (`\\p{N}`), so numbers are spelled digit by digit.
3. Map each UTF-8 byte of a word to a printable character (GPT-2's `bytes_to_unicode`), so a space is
   "Ġ" and every byte string is a plain str the vocab can key.
4. Merge adjacent symbols, always the pair with the lowest merge rank first, until no pair merges.
Decoding concatenates each token's bytes and decodes UTF-8 once at the end.

The same class loads HF tokenizer.json files whose pre-tokenizer is a byte-level one (Llama 3's HF
tokenizer.json is too). `from_gguf` / `from_hf_json` turn the files' fields into constructor
arguments; the GGUF header itself is read by llama/common/gguf_header.py.
"""

from __future__ import annotations

import heapq
import json
import re
from pathlib import Path

import regex

from llama.tokenizer.chat import ChatMLFormat, hf_template_format

# GPT-2's pre-tokenizer (HF ByteLevel with use_regex=True, llama.cpp "gpt2").
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's pattern (Meta's tokenizer.py `pat_str`), the one copy: llama.tokenizer.Tokenizer.pat_str is it.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PREFIX_SPACE = None  # a pre_patterns entry: prepend " " to each piece (HF ByteLevel add_prefix_space)
# llama.cpp's `tokenizer.ggml.pre` names -> the regexes applied in order (same table as llama-vocab.cpp).
GGUF_PRE_TOKENIZERS = {
    **{name: [GPT2_PATTERN] for name in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{name: [r"\p{N}", GPT2_PATTERN]
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    **{name: [LLAMA3_PATTERN] for name in ("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "falcon3")},
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map: printable Latin-1 bytes map to themselves,
    the other 68 (controls, space, ...) to U+0100 onwards, so byte 0x20 (space) becomes 'Ġ'."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# str.translate table: mapped char -> chr(its byte), so .encode("latin-1") yields the bytes; unmapped
# Latin-1 chars go to U+FFFF so that encode fails and the slow path handles them.
_TO_LATIN1 = {ord(c): b for c, b in CHAR_TO_BYTE.items()} | {
    b: 0xFFFF for b in range(256) if chr(b) not in CHAR_TO_BYTE}


def split_isolated(pattern: regex.Pattern, text: str) -> list[str]:
    """Cut `text` at every match of `pattern`, keeping matches and the text between them as pieces
    (HF `Split(behavior="Isolated")`)."""
    pieces, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos:m.start()])
        if m.end() > m.start():
            pieces.append(m.group())
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces


class ByteLevelBPETokenizer:
    """Byte-level BPE from a vocab (token string -> id), ranked merges and special tokens.

    `pre_patterns`: regexes applied in order (each isolates its matches; PREFIX_SPACE instead prepends a
    space to every piece that lacks one, HF ByteLevel's add_prefix_space). `special_tokens`: name -> id
    of control tokens, matched in text only when `encode(allowed_special=...)` allows them.
    `added_tokens`: non-special added tokens, always matched (HF `special: false`, GGUF user-defined).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, pre_patterns: list,
                 special_tokens: dict[str, int], added_tokens: dict[str, int] | None = None,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                 add_bos: bool = False, ignore_merges: bool = False, default_system: str | None = None,
                 chat_template: str = ""):
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.pre_patterns = [p if p is PREFIX_SPACE else regex.compile(p) for p in pre_patterns]
        self.special_tokens = dict(special_tokens)
        self.added_tokens = dict(added_tokens or {})
        self.n_words = max([*vocab.values(), *self.special_tokens.values(), *self.added_tokens.values()]) + 1
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos
        self.ignore_merges = ignore_merges
        if sum(c in vocab for c in BYTE_TO_CHAR.values()) < 128:
            raise ValueError("the vocab lacks most single-byte tokens: not a byte-level BPE vocab")
        literal = {**self.special_tokens, **self.added_tokens}
        # id -> the bytes it stands for; specials are literal text, the rest go through CHAR_TO_BYTE.
        self.id_to_bytes: list[bytes] = [b""] * self.n_words
        for tok, i in vocab.items():
            self.id_to_bytes[i] = self._token_bytes(tok)
        for tok, i in literal.items():
            self.id_to_bytes[i] = tok.encode("utf-8")
        self._cache: dict[str, list[int]] = {}
        ends = {"<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"}
        self.stop_tokens = {i for t, i in self.special_tokens.items() if t in ends} | (
            {eos_id} if eos_id is not None else set())
        self.chat_format = self._chat_format(default_system, chat_template or "")

    @staticmethod
    def _token_bytes(token: str) -> bytes:
        try:  # fast path: every char is a mapped byte
            return token.translate(_TO_LATIN1).encode("latin-1")
        except UnicodeEncodeError:  # chars outside the map stand for their own UTF-8 (as in HF)
            return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode() for c in token)

    def _chat_format(self, default_system, template: str):
        if "<|im_start|>" in self.special_tokens and "<|im_end|>" in self.special_tokens:
            return ChatMLFormat(self, default_system)
        if "<|start_header_id|>" in self.special_tokens and "<|begin_of_text|>" in self.special_tokens:
            return hf_template_format(self, template)  # Llama 3; HF's 3.1 template adds its system block
        return None  # a base tokenizer with no chat markers

    # ---- encoding ----------------------------------------------------------------------------
    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special=(),
               disallowed_special=()) -> list[int]:
        """Text -> ids. Special-token text is plain text unless listed in `allowed_special` (a set of
        names, or "all"), like Meta's Llama 3 `encode`; names in `disallowed_special` raise instead."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        if (bos and self.bos_id is None) or (eos and self.eos_id is None):
            raise ValueError(f"this tokenizer has no {'BOS' if bos and self.bos_id is None else 'EOS'} token")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = set(self.special_tokens) if disallowed_special == "all" else set(disallowed_special)
        for name in disallowed - allowed:
            if name in s:
                raise ValueError(f"text contains the special token {name!r}; pass allowed_special to encode it")
        literal = {t: self.special_tokens[t] for t in allowed} | self.added_tokens
        ids = [self.bos_id] if bos else []
        if literal:
            # Longest first, so "<|im_start|>" wins over any token that is its prefix.
            alternation = "|".join(re.escape(t) for t in sorted(literal, key=len, reverse=True))
            for part in re.split(f"({alternation})", s):
                ids.extend([literal[part]] if part in literal else self._encode_ordinary(part))
        else:
            ids.extend(self._encode_ordinary(s))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        pieces = [text] if text else []
        for pattern in self.pre_patterns:
            if pattern is PREFIX_SPACE:
                pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            else:
                pieces = [p for piece in pieces for p in split_isolated(pattern, piece)]
        ids = []
        for piece in pieces:
            cached = self._cache.get(piece)
            if cached is None:
                cached = self._bpe("".join(BYTE_TO_CHAR[b] for b in piece.encode("utf-8")))
                if len(self._cache) > 200_000:  # bound the memory a long stream can pin
                    self._cache.clear()
                self._cache[piece] = cached
            ids.extend(cached)
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Merge a byte-mapped word: the lowest-ranked adjacent pair first, leftmost on ties.
        A heap over pair positions makes it O(n log n), so a 100k-space run is fine."""
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        # Bytes with no token of their own are dropped, as HF does with no unk token (SmolLM2 lacks
        # 21 rare bytes, e.g. 0x04 and 0xF5-0xFF, which never occur in valid UTF-8 text anyway).
        syms = [c for c in word if c in self.vocab]
        nxt = list(range(1, len(syms) + 1))  # linked list over symbol positions; len = end
        prv = list(range(-1, len(syms) - 1))
        heap = [(r, i, syms[i], syms[i + 1]) for i in range(len(syms) - 1)
                if (r := self.ranks.get((syms[i], syms[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if syms[i] != left or j >= len(syms) or syms[j] != right:
                continue  # stale: one side was merged away since this entry was pushed
            syms[i], syms[j] = left + right, None
            nxt[i] = nxt[j]
            if nxt[i] < len(syms):
                prv[nxt[i]] = i
            for a, b in ((prv[i], i), (i, nxt[i])):
                if a >= 0 and b < len(syms) and (r := self.ranks.get((syms[a], syms[b]))) is not None:
                    heapq.heappush(heap, (r, a, syms[a], syms[b]))
        try:
            return [self.vocab[s] for s in syms if s is not None]
        except KeyError as e:
            raise ValueError(f"merged symbol {e.args[0]!r} is not in the vocab (inconsistent merges)") from None

    # ---- decoding ----------------------------------------------------------------------------
    def decode_bytes(self, ids, at_start: bool = True) -> bytes:
        try:
            return b"".join(self.id_to_bytes[i] for i in ids)
        except IndexError:
            bad = next(i for i in ids if not 0 <= i < self.n_words)
            raise ValueError(f"token id {bad} is out of range for a vocab of {self.n_words}") from None

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, meta: dict, path: Path) -> "ByteLevelBPETokenizer":
        """From GGUF metadata (llama.common.gguf_header's reader): tokens, merges, token types, special ids."""
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported "
                             f"(known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))})")
        tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
        vocab = {t: i for i, t in enumerate(tokens)}
        types = list(types)  # GGUF token types: 1 normal, 3 control (special), 4 user-defined (added)
        control = {t: i for i, t in enumerate(tokens) if i < len(types) and types[i] == 3}
        user = {t: i for i, t in enumerate(tokens) if i < len(types) and types[i] == 4}
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        return cls(
            vocab, merges, pre_patterns=GGUF_PRE_TOKENIZERS[pre], special_tokens=control, added_tokens=user,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            ignore_merges=pre in GGUF_PRE_TOKENIZERS and GGUF_PRE_TOKENIZERS[pre] == [LLAMA3_PATTERN],
            default_system=default_system_prompt(meta.get("tokenizer.chat_template", "")),
            chat_template=meta.get("tokenizer.chat_template", ""))

    @classmethod
    def from_hf_json(cls, tok_json: dict, config: dict, template: str, path: Path) -> "ByteLevelBPETokenizer":
        """From an HF tokenizer.json (+ tokenizer_config.json and chat template, may be empty)."""
        model = tok_json.get("model") or {}
        if model.get("type") != "BPE" or (tok_json.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError(f"{path}: only byte-level BPE tokenizer.json files are supported (this one has "
                             f"model {model.get('type')!r}, decoder {(tok_json.get('decoder') or {}).get('type')!r});"
                             " for a sentencepiece (Llama 2) model pass its tokenizer.model")
        patterns = hf_pre_patterns(tok_json.get("pre_tokenizer"), path)
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = tok_json.get("added_tokens") or []
        special = {a["content"]: a["id"] for a in added if a.get("special")}
        plain = {a["content"]: a["id"] for a in added if not a.get("special")}
        ids = {**model["vocab"], **special, **plain}

        def token_id(key):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return ids.get(value) if value is not None else None

        add_bos = config.get("add_bos_token")
        if add_bos is None:  # the fast tokenizer's post-processor is what adds BOS in HF
            single = (tok_json.get("post_processor") or {}).get("single") or [{}]
            add_bos = "SpecialToken" in single[0]
        return cls(model["vocab"], merges, pre_patterns=patterns, special_tokens=special, added_tokens=plain,
                   bos_id=token_id("bos_token"), eos_id=token_id("eos_token"), pad_id=token_id("pad_token"),
                   add_bos=bool(add_bos), ignore_merges=bool(model.get("ignore_merges")),
                   default_system=default_system_prompt(template), chat_template=template)


def gguf_to_hf_json(meta: dict) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) for a GGUF's byte-level BPE tokenizer: small files that
    `from_hf_json` reads back into the same tokenizer (ids, specials, BOS/EOS, chat template), so a
    checkpoint fine-tuned from a GGUF carries its tokenizer without the GGUF's weights."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))})")
    tokens, types = list(meta["tokenizer.ggml.tokens"]), [int(t) for t in meta.get("tokenizer.ggml.token_type", [])]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == 3} for i, t in enumerate(tokens) if i < len(types) and types[i] in (3, 4)]
    steps = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
             for p in GGUF_PRE_TOKENIZERS[pre]]
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    tok_json = {
        "version": "1.0", "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                            "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": GGUF_PRE_TOKENIZERS[pre] == [LLAMA3_PATTERN],
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(meta["tokenizer.ggml.merges"])},
    }
    config = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "tokenizer_class": "PreTrainedTokenizerFast"}
    for key, gguf_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("pad_token", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{gguf_key}")
        if i is not None and 0 <= i < len(tokens):
            config[key] = tokens[i]
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok_json, config


def hf_pre_patterns(pre: dict | None, path: Path) -> list:
    """HF pre_tokenizer JSON -> the steps for `pre_patterns` (regexes, PREFIX_SPACE)."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    patterns = []
    for step in steps:
        kind = (step or {}).get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                patterns.append(PREFIX_SPACE)
            if step.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
        elif kind == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step["pattern"]
            patterns.append(pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"]))
        else:
            raise ValueError(f"{path}: pre-tokenizer step {step} is not supported "
                             "(supported: ByteLevel, Digits, Split with behavior Isolated)")
    return patterns


def default_system_prompt(template: str) -> str | None:
    """The system message a ChatML template inserts when a dialog has none (SmolLM2 has one)."""
    m = re.search(r"<\|im_start\|>system\n([^'\"{}<]+)<\|im_end\|>", template or "")
    return m.group(1) if m and "!= 'system'" in template else None


def load_hf_json(path: Path) -> tuple[dict, dict, str]:
    """(tokenizer.json, tokenizer_config.json or {}, chat template or "") for a file or directory."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    tok_json = json.loads(file.read_text(encoding="utf-8"))
    config_file, jinja = file.parent / "tokenizer_config.json", file.parent / "chat_template.jinja"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    template = jinja.read_text(encoding="utf-8") if jinja.exists() else config.get("chat_template") or ""
    return tok_json, config, template if isinstance(template, str) else ""
