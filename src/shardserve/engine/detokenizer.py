"""Incremental detokenization: one output's text, grown one token at a time.

Decoding the whole output again for every new token costs O(L^2) over an output of L tokens;
decoding each token alone breaks multi-byte characters and SentencePiece's leading spaces. So
each token decodes a short window: the piece emitted last (for context) and the new tokens,
and only what the window adds beyond that piece is appended. Tokens that end inside a
multi-byte character wait for the rest unless the output is final.

Tokens go in one at a time, always: the engine core (matching stop strings) and the API
process (building the text a client sees) run the same steps on the same tokens and so reach
the same text, character for character, and a stop-string position found on one side cuts
the other's text at the same place.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read_offset]
        self.prefix_offset = 0  # decoding restarts here, for context
        self.read_offset = 0

    def push(self, token_ids: list[int]) -> None:
        """Append ``token_ids``, each in its own step."""
        for token in token_ids:
            self.ids.append(token)
            self._step(final=False)

    def finish(self) -> None:
        """The output is complete: decode what waited for the rest of a character."""
        self._step(final=True)

    def _step(self, final: bool) -> None:
        ids = self.ids
        if self.read_offset == len(ids):
            return
        decode = self.tokenizer.decode
        prefix = decode(ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full = decode(ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if final or (len(full) > len(prefix) and not full.endswith("\ufffd")):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
