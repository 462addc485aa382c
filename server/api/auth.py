"""Bearer-token checks for the admin and inference routes (FastAPI dependencies).

Admin routes: with --admin-token, the token is required (401 otherwise); without one, only
loopback clients are served (403 for others), so an unconfigured server is never administrable
from the network. Inference routes require --api-key when it is set.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from server.errors import ForbiddenError, UnauthorizedError


def bearer_token(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def token_matches(given: str | None, expected: str) -> bool:
    # Constant-time comparison: response timing must not reveal how much of a guess was right.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:  # not an IP address (e.g. a unix socket peer name)
        return False


def check_admin(given: str | None, client_host: str | None, expected: str | None) -> None:
    """Raise unless an admin request may pass: the token when one is set, else loopback only."""
    if expected is None:
        if not is_loopback(client_host):
            raise ForbiddenError(
                "the admin API answers only loopback clients unless --admin-token (LORASWAP_ADMIN_TOKEN) is set"
            )
        return
    if not token_matches(given, expected):
        raise UnauthorizedError("missing or wrong admin token (send 'Authorization: Bearer <token>')")


def check_api_key(given: str | None, expected: str | None) -> None:
    """Raise unless an inference request may pass (any request when no key is set)."""
    if expected is not None and not token_matches(given, expected):
        raise UnauthorizedError("missing or wrong API key (send 'Authorization: Bearer <key>')")


def require_admin(request: Request) -> None:
    check_admin(bearer_token(request), request.client.host if request.client else None, request.app.state.admin_token)


def require_api_key(request: Request) -> None:
    check_api_key(bearer_token(request), request.app.state.api_key)
