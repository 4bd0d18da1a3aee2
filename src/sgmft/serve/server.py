"""Run the app under uvicorn; on SIGTERM (or Ctrl-C) drain before exiting.

Draining: ``/v1/ready`` turns 503 and new requests get 503 + ``Retry-After`` while the
requests already in flight finish (at most ``drain_seconds``); then uvicorn closes the
socket and the process exits with status 0. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service, drain_seconds: float):
        super().__init__(config)
        self.service, self.drain_seconds = service, drain_seconds
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
        self.service.draining = True
        print(f"sgmft serve: {signal.Signals(sig).name}: draining ({self.service.in_flight} request(s) in "
              f"flight, at most {self.drain_seconds:g} s)", file=sys.stderr, flush=True)
        self._drain_task = True   # set before the task exists: a second signal is "stop now"
        self._loop.call_soon_threadsafe(lambda: setattr(self, "_drain_task", self._loop.create_task(self._drain())))

    async def _drain(self) -> None:
        done = await self.service.drain(self.drain_seconds)
        if not done:
            print(f"sgmft serve: {self.service.in_flight} request(s) still running after "
                  f"{self.drain_seconds:g} s; exiting", file=sys.stderr, flush=True)
        self.should_exit = True


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, drain_seconds: float = 30.0,
          log_level: str = "info", access_log: bool = False) -> None:
    """Serve ``app`` (from :func:`sgmft.serve.create_app`) until SIGTERM / Ctrl-C."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=max(1, int(drain_seconds)), lifespan="on")
    server = DrainingServer(config, app.state.service, drain_seconds)
    server.run()
