"""The ASGI layer in front of the endpoints: auth, body limits, content type, multipart
checks, error format.

Done here rather than in each endpoint because BentoML parses the body before an endpoint
runs: a 413 must come before the body is read, a 415 before BentoML picks a parser by
content type, a multipart body Starlette's parser would choke on (a 500) or misread (a text
part taken for a URL to fetch) must be refused before that parser sees it, and BentoML's
own 401/403 answers hide their reason.

In-flight bytes. Each API worker holds the bodies of its requests in progress (buffered
here, then decoded by the endpoint). `InflightBudget` caps their total per worker
(``BSCE_MAX_INFLIGHT_BYTES``): a request is charged its Content-Length before its body is
read (or each chunk as it arrives, without one) and credited when its answer is sent; a
request that would pass the cap is answered 503 with Retry-After, its body unread.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .forms import FormRefused, check_form
from .metrics import forget_dead_workers
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
    # Multipart fields that must be file parts (BentoML would fetch a text one as a URL).
    file_fields: frozenset[str] = frozenset()


def json_error(status: int, message: str, detail: Any = None) -> tuple[int, bytes]:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return status, json.dumps(body).encode()


class InflightBudget:
    """The request body bytes one worker holds, against its cap. One per `Gateway`, used
    from its event loop only, so no lock: nothing awaits between a check and its update."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


@dataclass
class _Hold:
    """What one request has taken from the budget (given back when it is answered)."""

    budget: InflightBudget
    taken: int = 0

    def take(self, n: int) -> bool:
        if not self.budget.take(n):
            return False
        self.taken += n
        return True

    def release(self) -> None:
        self.budget.give(self.taken)
        self.taken = 0


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
        metrics_path: str = "/metrics",
    ) -> None:
        self.app = app
        self.routes = dict(routes)
        self.prefixes = tuple(prefixes)
        self.settings = settings or Settings.from_env()
        self.metrics_path = metrics_path
        self.pid = str(os.getpid()).encode()
        self.budget = InflightBudget(self.settings.max_inflight_bytes)
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
        send = _json_route_miss(self._with_pid(send), scope["method"], scope["path"])
        route = self._route(scope["method"], scope["path"])
        if route is None:
            if scope["path"] == self.metrics_path:
                # Before the scrape is aggregated, so that it has no row of a dead worker.
                forget_dead_workers()
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        refusal = self._check_auth(route, headers) or self._check_head(route, headers)
        if refusal is not None:
            await _send_json(send, *refusal, extra=refusal_headers(refusal[0]))
            return
        hold = _Hold(self.budget)
        try:
            await self._pass(route, headers, hold, scope, receive, send)
        finally:
            hold.release()

    async def _pass(
        self,
        route: Route,
        headers: dict[bytes, bytes],
        hold: _Hold,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Read and check the body (if the route takes one), then call the app."""
        if route.media_types:
            body = await self._read_body(receive, headers, hold)
            refusal = body if isinstance(body, tuple) else self._check_body(route, headers, body)
            if refusal is not None:
                await _send_json(send, *refusal, extra=refusal_headers(refusal[0]))
                return
            receive = _replay(body, receive)  # type: ignore[arg-type]
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
        n = _content_length(headers)
        if isinstance(n, tuple):
            return n
        if n is not None and n > self.settings.max_body_bytes:
            return json_error(
                413, f"request body is {n} bytes; the limit is {self.settings.max_body_bytes}"
            )
        # A declared type must be one the route takes even with no body: BentoML picks its
        # parser by it, and its form parser fails (a 500) on a bodiless "multipart" request.
        typed = bool(headers.get(b"content-type")) or bool(n)
        if route.media_types and typed and _media_type(headers) not in route.media_types:
            return self._wrong_type(route, headers)
        return None

    def _check_body(
        self, route: Route, headers: dict[bytes, bytes], body: bytes
    ) -> tuple[int, bytes] | None:
        if body and _media_type(headers) not in route.media_types:
            return self._wrong_type(route, headers)
        if _media_type(headers) != MULTIPART:
            return None
        try:
            check_form(headers[b"content-type"].decode("latin-1"), body, route.file_fields)
        except FormRefused as e:
            return json_error(e.status, str(e))
        return None

    def _wrong_type(self, route: Route, headers: dict[bytes, bytes]) -> tuple[int, bytes]:
        got = _media_type(headers) or "none"
        return json_error(
            415, f"Content-Type {got!r} is not accepted here; send {' or '.join(route.media_types)}"
        )

    async def _read_body(
        self, receive: Receive, headers: dict[bytes, bytes], hold: _Hold
    ) -> bytes | tuple[int, bytes]:
        # Read whole (the endpoint would anyway), counting, so a chunked body without
        # Content-Length meets the same limits; one with it is charged before it is read.
        declared = _content_length(headers)
        if isinstance(declared, int) and not hold.take(declared):
            return self._busy()
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
            if declared is None and not hold.take(len(chunk)):
                return self._busy()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _busy(self) -> tuple[int, bytes]:
        return json_error(
            503,
            "this server worker holds its limit of request bytes in flight "
            f"({self.budget.limit}); retry shortly",
        )

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


def _content_length(headers: dict[bytes, bytes]) -> int | None | tuple[int, bytes]:
    """The declared body length, None without one, or the refusal of a bad one."""
    raw = headers.get(b"content-length")
    if raw is None:
        return None
    try:
        n = int(raw)
    except ValueError:
        return json_error(400, "Content-Length is not a number")
    return n if n >= 0 else json_error(400, "Content-Length is negative")


def refusal_headers(status: int) -> list[tuple[bytes, bytes]]:
    if status == 401:
        return [(b"www-authenticate", b'Bearer realm="bsce-serve"')]
    if status == 503:  # the gateway's 503 is "busy": a retry in a moment may pass
        return [(b"retry-after", b"1")]
    return []


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


def _json_route_miss(send: Send, method: str, path: str) -> Send:
    """Starlette's plain-text 404 and 405 (no route) as ``{"error": ...}`` like every other
    refusal; a JSON answer (an endpoint's own 404) passes as it is."""
    start: Message | None = None

    async def wrapped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and _is_route_miss(message, method):
            start = message
            return
        if start is None:
            await send(message)
            return
        if message.get("more_body", False):
            return  # the plain-text body is replaced whole
        headers = [
            (k, v)
            for k, v in start.get("headers", [])
            if k.lower() not in (b"content-type", b"content-length")
        ]
        allow = dict(headers).get(b"allow", b"").decode("latin-1")
        error = (
            f"no route for {method} {path}"
            if start["status"] == 404
            else f"{method} is not allowed on {path}" + (f"; use {allow}" if allow else "")
        )
        body = json.dumps({"error": error}).encode()
        headers += [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


def _is_route_miss(start: Message, method: str) -> bool:
    if start["status"] not in (404, 405) or method == "HEAD":
        return False
    types = [v for k, v in start.get("headers", []) if k.lower() == b"content-type"]
    return bool(types) and types[0].startswith(b"text/plain")
