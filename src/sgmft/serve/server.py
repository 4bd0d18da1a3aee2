"""Run the app under uvicorn: a limit on the request head, and draining on SIGTERM.

**Header limit.** uvicorn's httptools protocol has no limit on the size of the request line
and headers (a 100 MiB header costs seconds of CPU). :func:`limited_protocol` counts the
bytes of each request head as they arrive and, past ``--max-header-bytes``, answers 431
and closes the connection before parsing any further. With h11 (no httptools installed),
h11's own ``h11_max_incomplete_event_size`` applies (400 and close).

**Draining** (SIGTERM): ``/v1/ready`` answers 503 at once while requests are still served
for ``--drain-seconds`` (the grace a load balancer needs to notice); then new requests get
503 ``shutting_down``, the requests in flight finish (at most ``--shutdown-timeout``), the
listener closes and the process exits with status 0. Ctrl-C skips the grace; a second
signal exits at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

import uvicorn

log = logging.getLogger("sgmft.serve")


def limited_protocol(max_header_bytes: int, on_refuse=None):
    """A uvicorn httptools protocol class that refuses request heads over ``max_header_bytes``."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    body = json.dumps({"error": {"code": "headers_too_large", "field": "headers", "limit": max_header_bytes,
                                 "message": f"The request's headers are over {max_header_bytes} bytes. Send "
                                            "fewer or shorter headers (cookies, tokens).",
                                 "hint": "server flag --max-header-bytes"}}).encode()
    reply = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
             b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            self._head, self._in_head = 0, True
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            # Bytes of the current head so far, up to its end (a blank line) when it ends in this
            # chunk; checked before the parser sees them. A completed message resets the count, so
            # pipelined requests are counted one by one.
            if self._in_head:
                end = data.find(b"\r\n\r\n")
                self._head += len(data) if end < 0 else end + 4
                if self._head > max_header_bytes:
                    self._refuse()
                    return
            super().data_received(data)

        def _refuse(self) -> None:
            self._in_head = False
            if not self.transport.is_closing():
                self.transport.write(reply)
                self.transport.close()
                log.warning("request head over %d bytes from %s: 431, connection closed", max_header_bytes,
                            "%s:%d" % self.client if self.client else "?")
                if on_refuse is not None:
                    on_refuse()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._head, self._in_head = 0, True
            super().on_message_complete()

    return LimitedHttpToolsProtocol


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service, drain_seconds: float, shutdown_timeout: float):
        super().__init__(config)
        self.service, self.drain_seconds, self.shutdown_timeout = service, drain_seconds, shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | bool | None = None

    async def serve(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._drain_task is not None or self._loop is None:   # second signal: stop now
            if sig == signal.SIGINT and self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        grace = self.drain_seconds if sig != signal.SIGINT else 0.0
        self.service.ready = False
        print(f"sgmft serve: {signal.Signals(sig).name}: draining ({self.service.in_flight} request(s) in "
              f"flight; /v1/ready is 503 for {grace:g} s, then at most {self.shutdown_timeout:g} s for the "
              "requests in flight)", file=sys.stderr, flush=True)
        self._drain_task = True   # set before the task exists: a second signal is "stop now"
        self._loop.call_soon_threadsafe(
            lambda: setattr(self, "_drain_task", self._loop.create_task(self._drain(grace))))

    async def _drain(self, grace: float) -> None:
        await asyncio.sleep(grace)
        done = await self.service.drain(self.shutdown_timeout)
        if not done:
            print(f"sgmft serve: {self.service.in_flight} request(s) still running after "
                  f"{self.shutdown_timeout:g} s; exiting", file=sys.stderr, flush=True)
        self.should_exit = True


def make_server(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
                access_log: bool = False) -> DrainingServer:
    """A :class:`DrainingServer` for ``app`` (from :func:`sgmft.serve.create_app`), its limits from
    the app's :class:`ServeConfig`."""
    svc = app.state.service
    cfg = svc.cfg
    try:
        import httptools  # noqa: F401

        http = limited_protocol(cfg.max_header_bytes, lambda: svc.metrics.observe_request("other", 431, 0.0))
    except ImportError:
        http = "h11"
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log, http=http,
                            h11_max_incomplete_event_size=cfg.max_header_bytes,
                            timeout_graceful_shutdown=max(1, int(cfg.shutdown_timeout)), lifespan="on")
    server = DrainingServer(config, svc, cfg.drain_seconds, cfg.shutdown_timeout)
    svc.open_connections = lambda: len(server.server_state.connections)   # for the batchers' can_wait
    return server


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          access_log: bool = False) -> None:
    """Serve ``app`` until SIGTERM / Ctrl-C (see the module's docstring)."""
    make_server(app, host, port, log_level=log_level, access_log=access_log).run()
