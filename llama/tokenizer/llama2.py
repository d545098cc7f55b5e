"""Llama 2's tokenizer: a sentencepiece model, with Meta's Llama 2 API."""

from __future__ import annotations

import codecs

from llama.common.errors import one_line
from llama.tokenizer.chat import Llama2ChatFormat
from llama.tokenizer.errors import TokenizerError

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
            raise TokenizerError(f"{model_path}: not a sentencepiece model ({one_line(e)})") from None
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
