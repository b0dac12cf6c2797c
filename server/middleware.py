"""The ASGI layer in front of the endpoints: auth, body limit, content type, error format.

Done here rather than in each endpoint because BentoML parses the body before an endpoint
runs: a 413 must come before the body is read, a 415 before BentoML picks a parser by
content type, and BentoML's own 401/403 answers hide their reason.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .settings import Settings

Access = Literal["open", "read", "admin"]
JSON = "application/json"
MULTIPART = "multipart/form-data"


@dataclass(frozen=True)
class Route:
    """What the gateway enforces on one method + path."""

    access: Access
    media_types: tuple[str, ...] = ()  # accepted request bodies; () = no body expected
    # BentoML endpoints answer bad input with pydantic's error list; we reword it.
    reword_validation: bool = True


def json_error(status: int, message: str, detail: Any = None) -> tuple[int, bytes]:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return status, json.dumps(body).encode()


def _media_type(headers: dict[bytes, bytes]) -> str:
    raw = headers.get(b"content-type", b"").decode("latin-1")
    return raw.split(";", 1)[0].strip().lower()


def _describe_validation(detail: list[dict[str, Any]]) -> str:
    parts = []
    for err in detail[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("root",))
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":
            return f"malformed JSON: {msg.removeprefix('Invalid JSON: ')}"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(detail) - len(parts)
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class Gateway:
    """Pure ASGI middleware (added with ``Service.add_asgi_middleware``)."""

    def __init__(
        self,
        app: ASGIApp,
        routes: dict[tuple[str, str], Route],
        prefixes: Iterable[tuple[str, str, Route]] = (),
        settings: Settings | None = None,
    ) -> None:
        self.app = app
        self.routes = dict(routes)
        self.prefixes = tuple(prefixes)
        self.settings = settings or Settings.from_env()
        self.pid = str(os.getpid()).encode()
        s = self.settings
        self._admin = None if s.api_token is None else s.api_token.get_secret_value().encode()
        self._read = (
            None if s.predict_token is None else s.predict_token.get_secret_value().encode()
        )

    def _route(self, method: str, path: str) -> Route | None:
        route = self.routes.get((method, path.rstrip("/") or "/"))
        if route is not None:
            return route
        for m, prefix, r in self.prefixes:
            if m == method and path.startswith(prefix):
                return r
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._with_pid(send)
        route = self._route(scope["method"], scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        refusal = self._check_auth(route, headers) or self._check_head(route, headers)
        if refusal is not None:
            await _send_json(send, *refusal, extra=refusal_headers(refusal[0]))
            return
        if route.media_types:
            body = await self._read_body(receive)
            if isinstance(body, tuple):
                await _send_json(send, *body)
                return
            if body and _media_type(headers) not in route.media_types:
                await _send_json(send, *self._wrong_type(route, headers))
                return
            receive = _replay(body, receive)
        if route.reword_validation:
            send = _reword_400(send)
        await self.app(scope, receive, send)

    # -- checks ----------------------------------------------------------------------------

    def _check_auth(self, route: Route, headers: dict[bytes, bytes]) -> tuple[int, bytes] | None:
        if route.access == "open":
            return None
        accepted = [self._admin] if route.access == "admin" else [self._read, self._admin]
        if route.access == "admin" and self._admin is None:
            return None
        if route.access == "read" and self._read is None:
            return None
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if not auth or scheme.lower() != b"bearer" or not token.strip():
            return json_error(401, "this endpoint needs an 'Authorization: Bearer <token>' header")
        token = token.strip()
        if not any(t is not None and hmac.compare_digest(token, t) for t in accepted):
            return json_error(403, "the bearer token is not valid for this endpoint")
        return None

    def _check_head(self, route: Route, headers: dict[bytes, bytes]) -> tuple[int, bytes] | None:
        length = headers.get(b"content-length")
        if length is None:
            return None
        try:
            n = int(length)
        except ValueError:
            return json_error(400, "Content-Length is not a number")
        if n > self.settings.max_body_bytes:
            return json_error(
                413, f"request body is {n} bytes; the limit is {self.settings.max_body_bytes}"
            )
        if n > 0 and route.media_types and _media_type(headers) not in route.media_types:
            return self._wrong_type(route, headers)
        return None

    def _wrong_type(self, route: Route, headers: dict[bytes, bytes]) -> tuple[int, bytes]:
        got = _media_type(headers) or "none"
        return json_error(
            415, f"Content-Type {got!r} is not accepted here; send {' or '.join(route.media_types)}"
        )

    async def _read_body(self, receive: Receive) -> bytes | tuple[int, bytes]:
        # Read whole (the endpoint would anyway), counting, so a chunked body without
        # Content-Length meets the same limit.
        limit = self.settings.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return json_error(400, "the client disconnected before the body was complete")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return json_error(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _with_pid(self, send: Send) -> Send:
        pid = self.pid

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-worker-pid", pid)],
                }
            await send(message)

        return wrapped


def refusal_headers(status: int) -> list[tuple[bytes, bytes]]:
    return [(b"www-authenticate", b'Bearer realm="bsce-serve"')] if status == 401 else []


async def _send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [
        (b"content-type", JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # After the body, the real channel: it reports the client's disconnect when it comes.
        return await receive()

    return replay


def _reword_400(send: Send) -> Send:
    """Turn BentoML's '1 validation error for Input' into a sentence naming the field."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] == 400:
            start = message
            return
        if start is None:
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(chunks)
        try:
            data = json.loads(body)
            if (
                isinstance(data, dict)
                and "validation error" in str(data.get("error", ""))
                and isinstance(data.get("detail"), list)
            ):
                data["error"] = _describe_validation(data["detail"])
                body = json.dumps(data).encode()
        except ValueError:
            pass
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped
