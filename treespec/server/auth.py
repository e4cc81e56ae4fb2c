"""API-key guard: every route but /health needs `Authorization: Bearer KEY`, compared in constant time."""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from treespec.server.errors import ApiError, ErrorType

OPEN_PATHS = frozenset({"/health"})


class ApiKeyMiddleware:
    """Pure ASGI middleware, so it also guards unknown paths and streaming responses."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                         ErrorType.AUTHENTICATION, code="invalid_api_key")
        await error.response()(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, self._expected)
