"""Settings of the HTTP service: limits on what a request may carry, exposure, batching, shutdown.

Every field is a ``sgmft serve`` flag (``--max-body-bytes`` for ``max_body_bytes``, ...)
with the default below; docs/serve.md lists them. A request over a limit gets a 4xx
whose JSON body names the field and the limit; the limits are also stated in the OpenAPI
document (``maxLength``, ``maxItems``, ``x-limits``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Annotated

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as checked_dataclass

MiB = 1024 * 1024

#: > 0 (a limit, a count, a timeout); >= 0 (a wait that may be 0)
Positive = Annotated[int, Field(gt=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


# A pydantic dataclass like ModelConfig/TrainConfig (sgmft.config): every value is checked on
# construction (``ServeConfig(max_queue=0)`` is a ValueError naming max_queue); ``sgmft serve`` builds
# it through sgmft.config.build_config, so a bad flag is the one ConfigError shape of every config.
@checked_dataclass(frozen=True, config=ConfigDict(validate_assignment=True))
class ServeConfig:
    # -- limits (bad or hostile input) --------------------------------------------------------
    max_header_bytes: Positive = _f(64 * 1024, "largest request line + headers in bytes; above it the server "
                                               "answers 431 and closes the connection")
    max_body_bytes: Positive = _f(64 * MiB, "largest request body in bytes (413 above it)")
    max_image_bytes: Positive = _f(16 * MiB, "largest image in bytes, after base64 decoding (413 above it)")
    max_image_pixels: Positive = _f(40_000_000, "most pixels per image, read from the header before decoding: "
                                                "decompression bombs stop here (413 above it)")
    max_request_pixels: Positive = _f(100_000_000, "most pixels of all the images of one request together, read "
                                                   "from their headers before any decoding (413 above it)")
    max_images_per_post: Positive = _f(9, "most images in one post (Weibo allows 9)")
    max_text_chars: Positive = _f(5000, "longest post text in characters (Weibo long posts: up to 5000)")
    max_batch_posts: Positive = _f(64, "most posts in one /v1/predict/batch or /v1/predict/features request")
    decode_workers: Positive = _f(2, "threads that decode images, off the inference thread")
    # -- exposure -----------------------------------------------------------------------------
    allowed_hosts: str = _f("", "comma-separated Host header values accepted ('*.example.com' allowed; "
                                "'*' = any); default: the bind address, localhost, 127.0.0.1 and ::1")
    cors_origins: str = _f("", "comma-separated origins allowed to call the API from a browser "
                               "(e.g. https://app.example.com; '*' = any); default: none (same origin only)")
    expose_paths: bool = _f(False, "show file-system paths (the backbone's folder) in /v1/model")
    # -- dynamic batching --------------------------------------------------------------------
    max_batch_size: Positive = _f(32, "most posts per backbone + model forward (requests are grouped up to this)")
    max_wait_ms: NonNegative = _f(5.0, "how long a batch waits for more requests once it has one (ms)")
    max_queue: Positive = _f(512, "most posts waiting for a forward; beyond it requests get 503 + Retry-After")
    # -- shutdown ----------------------------------------------------------------------------
    drain_seconds: NonNegative = _f(5.0, "on SIGTERM: seconds during which /v1/ready answers 503 (so a load "
                                         "balancer stops sending) while requests are still served, before the "
                                         "listener closes")
    shutdown_timeout: PositiveSeconds = _f(30.0, "after the drain: longest wait for in-flight requests before exiting")

    @staticmethod
    def fields() -> list[dataclasses.Field]:
        return list(dataclasses.fields(ServeConfig))

    @staticmethod
    def split(value: str) -> list[str]:
        """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
        return [x.strip() for x in value.split(",") if x.strip()]

    def hosts(self, bind: str | None = None) -> list[str]:
        """The Host header values accepted (lower case, without port)."""
        given = self.split(self.allowed_hosts)
        if given:
            return [h.lower().strip("[]") for h in given]
        default = ["localhost", "127.0.0.1", "::1"]
        if bind and bind not in ("0.0.0.0", "::", "") and bind.lower().strip("[]") not in default:
            default.append(bind.lower().strip("[]"))
        return default

    def limits(self) -> dict:
        """The limits in force (for /v1/model and the OpenAPI document)."""
        return {k: getattr(self, k) for k in ("max_header_bytes", "max_body_bytes", "max_image_bytes",
                                              "max_image_pixels", "max_request_pixels", "max_images_per_post",
                                              "max_text_chars", "max_batch_posts")}
