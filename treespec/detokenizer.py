"""Incremental detokenization: token ids in, only the new, final text out.

A token's text depends on its neighbours: byte-fallback tokens (`<0xE6>`) only become a character together,
and SentencePiece decoders strip or add a space at the start of a sequence. So we decode a short window twice
-- up to the last emitted token, and up to the newest one -- and emit the difference. We hold it back while it
ends in U+FFFD (an incomplete UTF-8 character) or in a byte-fallback token: the ByteFallback decoder decodes a
run of byte tokens as one unit (all of it becomes U+FFFD if any byte is invalid), so a run must never straddle
two windows. The concatenated output then equals `decode(all ids)`.
"""
from __future__ import annotations

import re
from typing import Protocol, Sequence

_REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...


class IncrementalDetokenizer:
    """Feed ids with `push`; each call returns the text that became final. `flush` returns what is held back."""

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window starts here: context for the emitted part
        self.read_offset = 0    # text of ids[:read_offset] has been emitted

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset: self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT) or self._ends_in_byte_token():
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Everything not emitted yet, even an incomplete character (call once the sequence is finished)."""
        prefix = self._decode(self.ids[self.prefix_offset: self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]

    def _ends_in_byte_token(self) -> bool:
        return _BYTE_TOKEN.fullmatch(self.tokenizer.id_to_token(self.ids[-1]) or "") is not None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""
