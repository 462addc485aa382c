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
