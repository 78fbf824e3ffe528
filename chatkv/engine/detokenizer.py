"""Incremental detokenization: the text each new token adds, without decoding the whole reply again.

Decoding a token on its own can be wrong (a character split over several byte-level tokens, a
tokenizer that merges spaces), so each step decodes a short window: the tokens since the last
emitted text (``read``) plus a few before it (``prefix``) for context, and emits what the window
adds to the text of its context. Cost per token is the window's length, not the reply's, as in
vLLM's and text-generation-inference's streamers.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # first token of the context window
        self._read = 0  # first token whose text is not emitted yet

    def add(self, token_id: int) -> str | None:
        """The text ``token_id`` completes, or None while it ends in an incomplete multi-byte character."""
        self.ids.append(token_id)
        context = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(context):
            return None if text.endswith("\ufffd") else ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(context) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
