"""Stop strings, holding back possible stop prefixes, EOS and length limits: the core finishes on
token ids (server/sequence.py), the service side on text (server/text_stream.py)."""

from __future__ import annotations

import pytest

from server.sequence import GenerationRequest, Sequence, TokenOutput
from server.text_stream import RequestOutput, TextStream, find_stop, held_back


class CharTokenizer:
    """Token i is chr(i); enough to drive the text logic exactly."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i >= 32)


def run(text: str, *, stop: tuple[str, ...] = (), max_tokens: int = 100,
        eos: int | None = None) -> tuple[Sequence, TextStream, list[RequestOutput]]:
    """Feed `text` one character per token through the core's sequence and the text stream, as
    the engine and the service do; stop where either finishes (a stop string: the service would
    cancel the core request)."""
    request = GenerationRequest("r", [ord(">")], max_tokens=max_tokens)
    seq = Sequence(request, eos_ids=frozenset({eos} if eos else set()), max_len=1000)
    stream = TextStream(CharTokenizer(), request.prompt_ids, stop)
    events = []
    for ch in text:
        events.append(stream.feed(seq.append(ord(ch), 0.0)))
        if seq.finished or stream.finished:
            break
    return seq, stream, events


def test_helpers() -> None:
    assert find_stop("abcSTOPx", ("STOP",)) == 3
    assert find_stop("abc", ("STOP",)) is None
    assert held_back("abcST", ("STOP",)) == 2
    assert held_back("abcSTOP", ("STOPX",)) == 4
    assert held_back("abc", ("STOP",)) == 0


def test_stop_string_across_tokens_is_cut_and_never_streamed() -> None:
    seq, stream, events = run("hello END world", stop=("END",))
    streamed = "".join(e.text for e in events)
    assert streamed == "hello " and stream.finish_reason == "stop" and stream.stopped_by_string
    assert not seq.finished  # the core knows nothing of text: the service cancels it
    assert events[-1].finished and events[-1].completion_tokens == len("hello END")


def test_partial_stop_prefix_is_released_when_it_diverges() -> None:
    seq, stream, events = run("aEN b", stop=("END",), max_tokens=5)
    texts = [e.text for e in events]
    assert texts[:3] == ["a", "", ""]  # "E", "EN" held back
    assert "".join(texts) == "aEN b" and stream.finish_reason == "length" == seq.finish_reason


def test_eos_finishes_without_text() -> None:
    seq, stream, events = run("ab!cd", eos=ord("!"))  # "!" decodes to text, yet must not appear
    assert "".join(e.text for e in events) == "ab" and seq.finish_reason == "stop" == stream.finish_reason
    assert not stream.stopped_by_string and events[-1].completion_tokens == 3


def test_max_tokens() -> None:
    seq, stream, events = run("abcdef", max_tokens=3)
    assert "".join(e.text for e in events) == "abc" and stream.finish_reason == "length"
    assert len(seq.output_ids) == 3


def test_every_token_produces_an_event() -> None:
    _, _, events = run("aEN b", stop=("END",), max_tokens=5)
    assert [e.token_ids for e in events] == [[ord(c)] for c in "aEN b"]


def test_a_cancel_releases_what_was_held_back() -> None:
    stream = TextStream(CharTokenizer(), [ord(">")], ("END",))
    assert stream.feed(TokenOutput("r", [ord("E")], completion_tokens=1)).text == ""
    last = stream.feed(TokenOutput("r", [], finished=True, finish_reason="abort", completion_tokens=1))
    assert last.text == "E" and last.finished and last.finish_reason == "abort"


def test_events_after_the_text_finished_are_refused() -> None:
    _, stream, _ = run("xEND", stop=("END",))
    with pytest.raises(ValueError, match="already finished"):
        stream.feed(TokenOutput("r", [ord("y")]))


def test_a_stop_string_inside_a_multi_token_event_counts_the_tokens_up_to_it() -> None:
    stream = TextStream(CharTokenizer(), [ord(">")], ("ND",))
    event = stream.feed(TokenOutput("r", [ord(c) for c in "aNDbc"], completion_tokens=5))
    assert event.text == "a" and event.finished and event.completion_tokens == 3
    assert event.token_ids == [ord(c) for c in "aND"]
