"""Small stand-ins for driving the engine directly in tests."""

from __future__ import annotations

from server.sequence import RequestOutput


class NoText:
    """A tokenizer whose every decode is empty: for tests that look at token ids only."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


class Collector:
    """An engine sink that records each request's tokens, final event and finishing order."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.final: dict[str, RequestOutput] = {}
        self.order: list[str] = []

    def __call__(self, event: RequestOutput) -> None:
        self.tokens.setdefault(event.request_id, []).extend(event.token_ids)
        if event.finished:
            self.final[event.request_id] = event
            self.order.append(event.request_id)
