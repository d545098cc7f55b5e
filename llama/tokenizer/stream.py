"""Detokenize one token at a time, never showing half a character."""

import codecs


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
