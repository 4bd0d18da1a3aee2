"""Settings of the HTTP service: limits on what a request may carry, and dynamic batching.

Every field is a ``sgmft serve`` flag (``--max-body-bytes`` for ``max_body_bytes``, ...)
with the default below; docs/serve.md lists them. A request over a limit gets a 4xx
whose JSON body names the field and the limit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MiB = 1024 * 1024


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeConfig:
    # -- limits (bad or hostile input) --------------------------------------------------------
    max_body_bytes: int = _f(64 * MiB, "largest request body in bytes (413 above it)")
    max_image_bytes: int = _f(16 * MiB, "largest image in bytes, after base64 decoding (413 above it)")
    max_image_pixels: int = _f(40_000_000, "most pixels per image, read from the header before decoding: "
                                           "decompression bombs stop here (413 above it)")
    max_images_per_post: int = _f(9, "most images in one post (Weibo allows 9)")
    max_text_chars: int = _f(5000, "longest post text in characters (Weibo long posts: up to 5000)")
    max_batch_posts: int = _f(64, "most posts in one /v1/predict/batch or /v1/predict/features request")
    # -- dynamic batching --------------------------------------------------------------------
    max_batch_size: int = _f(32, "most posts per backbone + model forward (requests are grouped up to this)")
    max_wait_ms: float = _f(5.0, "how long a batch waits for more requests once it has one (ms)")
    max_queue: int = _f(512, "most posts waiting for a forward; beyond it requests get 503 + Retry-After")
    # -- shutdown ----------------------------------------------------------------------------
    drain_seconds: float = _f(30.0, "on SIGTERM: longest wait for in-flight requests before exiting")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if (f.name == "max_wait_ms" and v < 0) or (f.name != "max_wait_ms" and v <= 0):
                raise ValueError(f"{f.name} must be {'>= 0' if f.name == 'max_wait_ms' else '> 0'}, got {v}")

    @staticmethod
    def fields() -> list[dataclasses.Field]:
        return list(dataclasses.fields(ServeConfig))
