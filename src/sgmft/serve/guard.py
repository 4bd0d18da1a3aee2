"""The ASGI middleware in front of every request: Host and Origin checks, draining, the body
limit, quiet client disconnects, and the request metrics.

* **Host** (``--allowed-hosts``): a Host header not in the list gets 400 ``host_not_allowed``
  (DNS rebinding: a page on another site that resolves its own name to this server's address
  cannot talk to it).
* **Origin** (``--cors-origins``): a browser request from another origin that is not listed
  gets 403 ``origin_not_allowed`` before anything is read; listed origins get CORS headers
  (Starlette's ``CORSMiddleware``, inside this one). Same-origin requests (the page) pass.
* **Draining**: after the grace of ``--drain-seconds`` new requests get 503 ``shutting_down``.
* **Body limit** (``--max-body-bytes``): counted as it arrives (chunked uploads too).
* **Client disconnects** mid-body: one log line and ``status="499"`` in /metrics, not a 500.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

from starlette.requests import ClientDisconnect

from sgmft.serve.errors import ApiError, too_large

log = logging.getLogger("sgmft.serve")
ALWAYS_OPEN = {"/v1/health", "/v1/ready", "/metrics"}
CLIENT_CLOSED = 499          # nginx's code for "the client closed the connection"


class _BodyTooLarge(Exception):
    pass


def host_allowed(host: str, allowed: list[str]) -> bool:
    """``host`` (a Host header, maybe with a port) against ``allowed`` (``*.example.com``, ``*``)."""
    h = host.strip().lower()
    if h.startswith("["):                          # [::1]:8000
        h = h[1:].split("]", 1)[0]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    for a in allowed:
        if a == "*" or h == a or (a.startswith("*.") and h.endswith(a[1:])):
            return True
    return False


def origin_allowed(origin: str, host: str, cors: list[str]) -> bool:
    """Same origin as the Host header, or listed in ``--cors-origins``."""
    if "*" in cors or origin in cors:
        return True
    try:
        return urlsplit(origin).netloc.lower() == host.strip().lower() != ""
    except ValueError:
        return False


class Guard:
    def __init__(self, app, service, fast: dict | None = None):
        self.app, self.service = app, service
        self.fast = fast or {}           # (method, path) -> a bare ASGI handler (hot endpoints)
        cfg = service.cfg
        self.hosts, self.cors = cfg.hosts(), cfg.split(cfg.cors_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        svc, path = self.service, scope["path"]
        endpoint = svc.metrics.endpoint_label(path)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        headers = dict(scope.get("headers") or [])
        try:
            err = self._refuse(headers, path)
            if err is not None:
                await err.response()(scope, receive, send_wrapped)
            elif path in ALWAYS_OPEN:
                await self.app(scope, receive, send_wrapped)
            else:
                handler = self.fast.get((scope["method"], path), self.app)
                await self._limited(handler, headers, scope, receive, send_wrapped, status)
        except ClientDisconnect:
            status["code"] = CLIENT_CLOSED
            log.info("client disconnected before its request was read: %s %s", scope.get("method"), path)
        finally:
            svc.metrics.observe_request(endpoint, status["code"], time.perf_counter() - t0)

    def _refuse(self, headers: dict, path: str) -> ApiError | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.hosts):
            return ApiError(400, "host_not_allowed", f"This server does not answer to the host name {host!r}.",
                            field="Host", hint="server flag --allowed-hosts")
        origin = headers.get(b"origin")
        if origin is not None and not origin_allowed(origin.decode("latin-1"), host, self.cors):
            return ApiError(403, "origin_not_allowed", f"Pages from {origin.decode('latin-1')!r} may not use this "
                            "service.", field="Origin", hint="server flag --cors-origins")
        if self.service.draining and path not in ALWAYS_OPEN:
            return ApiError(503, "shutting_down", "The server is shutting down. Retry on another instance.",
                            headers={"Retry-After": "1", "Connection": "close"})
        return None

    async def _limited(self, app, headers: dict, scope, receive, send, status) -> None:
        svc, limit = self.service, self.service.cfg.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        svc.enter()
        try:
            if declared > limit:
                await too_large("body", "body size", declared, limit, "--max-body-bytes").response()(
                    scope, receive, send)
                return
            seen = 0

            async def receive_limited():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > limit:
                        raise _BodyTooLarge()
                return msg

            try:
                await app(scope, receive_limited, send)
            except _BodyTooLarge:
                if status["code"] == 500:
                    await too_large("body", "body size", seen, limit, "--max-body-bytes").response()(
                        scope, receive, send)
        finally:
            svc.leave()
