"""Small stand-ins for driving the engine directly in tests."""

from __future__ import annotations

from server.sequence import TokenOutput


class Collector:
    """An engine sink that records each request's tokens, final event and finishing order."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.final: dict[str, TokenOutput] = {}
        self.order: list[str] = []

    def __call__(self, event: TokenOutput) -> None:
        self.tokens.setdefault(event.request_id, []).extend(event.token_ids)
        if event.finished:
            self.final[event.request_id] = event
            self.order.append(event.request_id)
