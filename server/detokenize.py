"""Incremental detokenization that never emits a broken UTF-8 character.

Byte-level tokenizers split multi-byte characters (emoji, CJK) across tokens; decoding a prefix
then ends in U+FFFD. We decode a short window of recent tokens twice (with and without the new
ones) and emit the difference only once it no longer ends in a replacement character.

When generation stops in the middle of a character (max_tokens cut after 2 of an emoji's 3
tokens), the held-back bytes are dropped, as vLLM's detokenizer does: no returned text ends in a
U+FFFD that stands for an incomplete character.
"""

from __future__ import annotations

import os
from typing import Protocol

REPLACEMENT = "\ufffd"
# A token that is the lone byte 0x80 (a UTF-8 continuation byte): byte-level BPE vocabularies
# (GPT-2 style: Llama 3, Qwen, SmolLM) spell it "Ģ", SentencePiece byte fallback "<0x80>".
_CONTINUATION_TOKENS = ("\u0122", "<0x80>")


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], *, context: int = 4) -> None:
        self.tokenizer = tokenizer
        # Ids the tokenizer knows: an adapter's added tokens (modules_to_save) are past them and
        # have no text here (a slow tokenizer would raise on them).
        self.known = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        # A few prompt tokens give the first generated token its left context (leading spaces).
        self.ids: list[int] = list(prompt_ids[-context:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        known = self.known
        return self.tokenizer.decode(ids if known is None else [i for i in ids if i < known], skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation, without the U+FFFD of an
        incomplete trailing character."""
        window = self.ids[self.prefix_offset :]
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(window)
        self.prefix_offset = self.read_offset = len(self.ids)
        text = full[len(prefix) :] if len(full) > len(prefix) else ""
        return complete_part(text, self._probe(window, len(prefix))) if text.endswith(REPLACEMENT) else text

    def _probe(self, window: list[int], skip: int) -> list[str]:
        """The held-back text decoded again with 1, 2 and 3 continuation bytes appended (empty if
        the vocabulary has no lone continuation byte)."""
        convert = getattr(self.tokenizer, "convert_tokens_to_ids", None)
        if convert is None:
            return []
        for token in _CONTINUATION_TOKENS:
            probe = convert(token)
            if isinstance(probe, int) and self._decode([probe]) == REPLACEMENT:
                return [self._decode(window + [probe] * k)[skip:] for k in (1, 2, 3)]
        return []


def complete_part(text: str, probed: list[str]) -> str:
    """`text` (ending in U+FFFD) without its incomplete trailing character. `probed` is the same
    tokens decoded with 1..3 continuation bytes appended: if the trailing bytes are a cut
    character, some count of continuation bytes completes it, and the text before it is what
    `text` and that decoding share. A U+FFFD the model spelled out in full (EF BF BD) is never
    completed, so it stays. Without probes, every trailing U+FFFD is taken for a cut character."""
    for candidate in probed:
        common = os.path.commonprefix([text, candidate])
        rest = candidate[len(common) :]
        if rest and not rest.startswith(REPLACEMENT):  # the cut character, completed
            return common
    return text.rstrip(REPLACEMENT) if not probed else text
