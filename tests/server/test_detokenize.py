from __future__ import annotations

import pytest

from server.detokenize import REPLACEMENT, IncrementalDetokenizer

TEXTS = [
    "Hello 👋 world 🎉🎉 and 🧑‍🚀!",
    "東京は日本の首都です。北京是中国的首都。",
    "mixed: café, naïve, 한국어, emoji 🦀 end",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_never_breaks_characters(smollm_tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = smollm_tokenizer.encode(text, add_special_tokens=False)
    # The byte-level tokenizer really does split characters across tokens here.
    assert any(REPLACEMENT in smollm_tokenizer.decode([t]) for t in ids)
    detok = IncrementalDetokenizer(smollm_tokenizer, prompt_ids=[])
    deltas = [detok.push(t) for t in ids]
    deltas.append(detok.flush())
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == smollm_tokenizer.decode(ids) == text


def test_prompt_context_and_special_tokens(smollm_tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = smollm_tokenizer.encode("Say:", add_special_tokens=False)
    out = smollm_tokenizer.encode(" ok 世界", add_special_tokens=False) + [2]  # 2 = <|im_end|>
    detok = IncrementalDetokenizer(smollm_tokenizer, prompt_ids=prompt)
    text = "".join(detok.push(t) for t in out) + detok.flush()
    assert text == " ok 世界"


def stream(tokenizer, ids: list[int]) -> str:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    return "".join(detok.push(t) for t in ids) + detok.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_cut_anywhere_ends_before_the_cut_character(smollm_tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    """Stopping after any number of tokens (max_tokens) gives the longest prefix of the text made
    of whole characters: the incomplete bytes are dropped, never turned into U+FFFD."""
    ids = smollm_tokenizer.encode(text, add_special_tokens=False)
    for cut in range(len(ids) + 1):
        out = stream(smollm_tokenizer, ids[:cut])
        assert REPLACEMENT not in out, (cut, out)
        assert text.startswith(out), (cut, out)
        # Nothing whole was dropped: the next token does not start a character of its own here.
        decoded = smollm_tokenizer.decode(ids[:cut])
        assert out == decoded.rstrip(REPLACEMENT), (cut, out, decoded)


def test_a_replacement_character_the_model_spelled_out_is_kept(smollm_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = smollm_tokenizer.encode(f"odd {REPLACEMENT}", add_special_tokens=False)
    assert stream(smollm_tokenizer, ids) == f"odd {REPLACEMENT}"
    # ... and a cut character right after it is still dropped.
    party = smollm_tokenizer.encode("🎉", add_special_tokens=False)
    assert stream(smollm_tokenizer, ids + party[:2]) == f"odd {REPLACEMENT}"


class DecodeOnly:
    """A decoder without convert_tokens_to_ids: trailing U+FFFD is then always taken for a cut."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_without_a_continuation_token_trailing_replacements_are_dropped(smollm_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = smollm_tokenizer.encode("go 🎉🎉", add_special_tokens=False)
    assert stream(DecodeOnly(smollm_tokenizer), ids[:-1]) == "go 🎉"
