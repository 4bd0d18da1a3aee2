"""What an app instance of the HTTP service shares (:class:`Service`): the predictor, the
dynamic batchers, the image decoder, the metrics and the draining state."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sgmft.serve import inputs
from sgmft.serve.batching import Batcher, QueueFull
from sgmft.serve.config import ServeConfig
from sgmft.serve.errors import ApiError
from sgmft.serve.metrics import Metrics

__all__ = ["Service"]


class Service:
    """Everything an app instance shares: the predictor, the batchers, the decoder, metrics, draining."""

    def __init__(self, pp, config: ServeConfig, run_info: dict):
        from sgmft.features.encode import reduce_side

        self.pp, self.cfg, self.run_info = pp, config, run_info
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgmft-infer")
        self.decoder = inputs.Decoder(config.decode_workers, config.max_image_pixels, reduce_side(pp.backbone))
        kw = dict(max_batch=config.max_batch_size, max_wait_ms=config.max_wait_ms, max_queue=config.max_queue,
                  on_batch=self.metrics.observe_batch, can_wait=self._can_wait)
        #: open HTTP connections (set by the server, :func:`sgmft.serve.server.make_server`); None: unknown
        self.open_connections = None
        self.waiting = 0          # requests waiting for a batcher's answer
        self.posts = Batcher("posts", self._run_posts, self.executor, **kw)
        self.features = Batcher("features", self._run_features, self.executor, **kw)
        self.metrics.track_queues({"posts": self.posts, "features": self.features})
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.draining = False
        self.ready = True
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    # runs on the inference thread: the images are decoded already (PPM copies)
    def _run_posts(self, items: list[inputs.CheckedPost]) -> list[dict]:
        return self.pp.predict_posts([(p.text, p.decoded) for p in items])

    def _run_features(self, items: list[tuple]) -> list[tuple]:
        """items: ``(text vector | None, image vector | None, explain)``; explanations are computed
        for the whole batch when any of its requests asked for them."""
        d, n = self.pp.predictor.dim, len(items)
        text, image = np.zeros((n, d), np.float32), np.zeros((n, d), np.float32)
        tm, im = np.zeros(n, bool), np.zeros(n, bool)
        for r, (t, i, _) in enumerate(items):
            if t is not None:
                text[r], tm[r] = t, True
            if i is not None:
                image[r], im[r] = i, True
        kw = {"explain": True} if any(x[2] for x in items) else {}
        pr = self.pp.predictor.predict_features(text, image, tm, im, **kw)
        unc = getattr(pr, "uncertain", None)
        expl = getattr(pr, "explanations", None)
        return [(pr.probs[r], None if unc is None else bool(unc[r]),
                 None if expl is None or not items[r][2] else expl[r]) for r in range(n)]

    # draining (SIGTERM): new requests get 503, in-flight ones finish
    def enter(self) -> None:
        self.in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests; wait (at most ``timeout`` s) for in-flight ones. True if all finished."""
        self.draining, self.ready = True, False
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except (asyncio.TimeoutError, TimeoutError):
            return self.in_flight == 0

    async def close(self) -> None:
        await self.posts.stop()
        await self.features.stop()
        self.decoder.close()
        self.executor.shutdown(wait=True)

    def _can_wait(self) -> bool:
        """Whether a batch may still wait for batch-mates: some open connection is not waiting for an
        answer already (a keep-alive HTTP/1.1 client sends its next request after the answer)."""
        return self.open_connections is None or self.waiting < self.open_connections()

    async def submit(self, batcher: Batcher, items: list):
        self.waiting += 1
        try:
            return await batcher.submit(items)
        except QueueFull as e:
            raise ApiError(503, "queue_full", f"The server is busy ({e.depth} posts waiting). Retry in "
                           f"{e.retry_after} s.", limit=e.limit, headers={"Retry-After": str(e.retry_after)},
                           hint="server flag --max-queue") from None
        finally:
            self.waiting -= 1
