"""Stop strings, holding back possible stop prefixes, EOS and length limits (text side only)."""

from __future__ import annotations

from server.sequence import GenerationRequest, Sequence, find_stop, held_back


class CharTokenizer:
    """Token i is chr(i); enough to drive the text logic exactly."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i >= 32)


def run(text: str, *, stop: tuple[str, ...] = (), max_tokens: int = 100, eos: int | None = None):  # type: ignore[no-untyped-def]
    request = GenerationRequest("r", [ord(">")], max_tokens=max_tokens, stop=stop)
    seq = Sequence(request, CharTokenizer(), eos_ids=frozenset({eos} if eos else set()), max_len=1000)
    events = []
    for ch in text:
        events.append(seq.append(ord(ch) if ch != "\0" else 3))
        if seq.finished:
            break
    return seq, events


def test_helpers() -> None:
    assert find_stop("abcSTOPx", ("STOP",)) == 3
    assert find_stop("abc", ("STOP",)) is None
    assert held_back("abcST", ("STOP",)) == 2
    assert held_back("abcSTOP", ("STOPX",)) == 4
    assert held_back("abc", ("STOP",)) == 0


def test_stop_string_across_tokens_is_cut_and_never_streamed() -> None:
    seq, events = run("hello END world", stop=("END",))
    streamed = "".join(e.text for e in events if e)
    assert streamed == "hello " and seq.finish_reason == "stop"
    assert events[-1].finished and events[-1].completion_tokens == len("hello END")


def test_partial_stop_prefix_is_released_when_it_diverges() -> None:
    seq, events = run("aEN b", stop=("END",), max_tokens=5)
    texts = [e.text for e in events]
    assert texts[:3] == ["a", "", ""]  # "E", "EN" held back
    assert "".join(texts) == "aEN b" and seq.finish_reason == "length"


def test_eos_finishes_without_text() -> None:
    seq, events = run("ab!cd", eos=ord("!"))  # "!" decodes to text, yet must not appear
    assert "".join(e.text for e in events) == "ab" and seq.finish_reason == "stop"


def test_max_tokens() -> None:
    seq, events = run("abcdef", max_tokens=3)
    assert "".join(e.text for e in events) == "abc" and seq.finish_reason == "length"
    assert len(seq.output_ids) == 3


def test_every_token_produces_an_event() -> None:
    _, events = run("aEN b", stop=("END",), max_tokens=5)
    assert [e.token_ids for e in events] == [[ord(c)] for c in "aEN b"]
