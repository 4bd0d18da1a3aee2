"""`sgmft serve` as a service on a network (issue 21): one test per numbered finding.

1 header size limit (431 + close) on the real uvicorn stack; 2 the per-request pixel budget
and decoding off the inference thread; 3 `on_bad_image=skip` for every kind of bad image;
5 quiet client disconnects; 6 exposure (paths, Host, CORS); 7 one error per cause; 9 the
drain grace and a Retry-After computed from the queue. (4, the schema: tests/test_serve_schema.py;
8, the page: tests/test_serve_browser.py.) Timings are measured in benchmarks/bench_serve.py
(`--hostile`), not asserted here."""

from __future__ import annotations

import base64
import logging
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from serve_support import LiveServer, env, png_bytes, png_claiming, pp, raw_http  # noqa: E402,F401  (env, pp: shared fixtures)
from sgmft.serve import ServeConfig, create_app  # noqa: E402

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def live(pp):
    app = create_app(pp, ServeConfig(max_header_bytes=64 * 1024))
    with LiveServer(app) as s:
        yield s


def _client(pp, **cfg):
    return TestClient(create_app(pp, ServeConfig(**cfg)), base_url=BASE)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def _metric(text: str, endpoint: str, status: str) -> float:
    key = f'sgmft_http_requests_total{{endpoint="{endpoint}",status="{status}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key))


# -- 1: header size ------------------------------------------------------------------------------
def test_header_limit_431_and_close(live):
    big = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
    answer = raw_http(live.port, big)
    assert _status(answer) == 431 and b"headers_too_large" in answer and b"connection: close" in answer.lower()
    # a long URL counts too
    answer = raw_http(live.port, b"GET /" + b"x" * 100_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert _status(answer) == 431
    # under the limit, and several requests on one keep-alive connection: each head counted alone
    ok = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Mid: " + b"b" * 40_000 + b"\r\n\r\n"
    answer = raw_http(live.port, ok + ok + ok.replace(b"1.1\r\n", b"1.1\r\nConnection: close\r\n", 1))
    assert answer.count(b"HTTP/1.1 200") == 3, answer[:300]


# -- 2: a per-request decode budget, decoding off the inference thread ----------------------------
def test_request_pixel_budget_refuses_from_headers(pp):
    post = {"text": "x", "images": [_b64(png_claiming(6300, 6300))] * 9}      # the request, headers only
    with _client(pp) as c:
        r = c.post("/v1/predict/batch", json={"posts": [post] * 16})
        e = r.json()["error"]
        assert r.status_code == 413 and e["code"] == "request_pixels_too_large" and e["field"] == "body"
        assert e["limit"] == ServeConfig().max_request_pixels and "over 100,000,000 pixels" in e["message"]
        assert "split the batch" in e["message"]
        assert "--max-request-pixels" in e["hint"]
        # and in a single post, multipart: the same code
        files = [("images", (f"{i}.png", png_claiming(6300, 6300), "image/png")) for i in range(3)]
        r = c.post("/v1/predict", data={"text": "x"}, files=files)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_pixels_too_large"
    with _client(pp, max_request_pixels=2000) as c:                      # 40x30 + 40x30 > 2000
        r = c.post("/v1/predict", json={"text": "x", "images": [_b64(png_bytes())] * 2})
        assert r.status_code == 413 and r.json()["error"]["limit"] == 2000
        assert c.post("/v1/predict", json={"text": "x", "images": [_b64(png_bytes())]}).status_code == 200


def test_images_are_decoded_off_the_inference_thread(pp, env, monkeypatch):
    import sgmft.serve.inputs as inputs

    seen, given = [], []
    real = inputs.load_image_bytes

    def spy(img, **kw):
        seen.append(threading.current_thread().name)
        return real(img, **kw)

    monkeypatch.setattr(inputs, "load_image_bytes", spy)
    app = create_app(pp)
    svc = app.state.service
    run = svc.posts.fn

    def record(items):
        given.append((threading.current_thread().name, [im.data[:2] for p in items for im in p.decoded]))
        return run(items)

    svc.posts.fn = record
    p = next(p for p in env["posts"] if len(p.images) > 1)
    want = pp.predict_post(p.text, [str(x) for x in p.images])
    with TestClient(app, base_url=BASE) as c:
        r = c.post("/v1/predict", json={"text": p.text, "images": [_b64(Path(x).read_bytes()) for x in p.images]})
    assert r.status_code == 200
    assert len(seen) == len(p.images) and all(t.startswith("sgmft-decode") for t in seen), seen
    (thread, heads), = given
    assert thread.startswith("sgmft-infer") and heads == [b"P6"] * len(p.images)   # raw pixels only
    got = r.json()["probs"]
    assert all(abs(got[k] - v) < 1e-6 for k, v in want["probs"].items())           # the same prediction


# -- 3: on_bad_image=skip for every kind ---------------------------------------------------------
def _bad_images(env) -> dict:
    import io

    from PIL import Image

    good = Path(next(p for p in env["posts"] if p.images).images[0]).read_bytes()

    def made(fmt: str) -> bytearray:
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, fmt)
        return bytearray(buf.getvalue())

    bmp = made("BMP")
    bmp[28:30] = (7).to_bytes(2, "little")                               # header: 7 bits per pixel
    gif = made("GIF")
    gif[len(gif) // 2:len(gif) // 2 + 10] = b"\xff" * 10                 # data: a broken LZW stream
    return {"not_an_image": b"this is not an image", "empty_image": b"",
            "truncated_image": good[: len(good) // 2], "corrupt_image": bytes(bmp), "corrupt_data": bytes(gif),
            "image_pixels_too_large": png_claiming(8_000, 6_000),
            "pil_bomb": png_claiming(100_000, 100_000), "image_size_too_large": good + b"\0" * 64}


@pytest.mark.parametrize("kind", ["not_an_image", "empty_image", "truncated_image", "corrupt_image", "corrupt_data",
                                  "image_pixels_too_large", "pil_bomb", "image_size_too_large"])
def test_skip_every_kind_of_bad_image(pp, env, kind):
    """Each kind of the docs' table: refused with its own code, or skipped with a warning."""
    good = Path(next(p for p in env["posts"] if p.images).images[0]).read_bytes()
    bad = _bad_images(env)[kind]
    code = {"pil_bomb": "image_pixels_too_large", "corrupt_data": "corrupt_image"}.get(kind, kind)
    with _client(pp, max_image_bytes=len(good) + 32) as c:
        want = c.post("/v1/predict", json={"text": "看电影", "images": [_b64(good)]}).json()
        for how in ("json", "form"):
            if how == "json":
                r = c.post("/v1/predict", json={"text": "看电影", "images": [_b64(bad), _b64(good)],
                                                "on_bad_image": "skip"})
                name = "image 1"
            else:
                r = c.post("/v1/predict", data={"text": "看电影", "on_bad_image": "skip"},
                           files=[("images", ("bad.jpg", bad, "image/jpeg")), ("images", ("ok.jpg", good, "image/jpeg"))])
                name = "image 1 (bad.jpg)"
            assert r.status_code == 200, (how, r.text)
            j = r.json()
            assert j["image_index"] == 1 and j["probs"] == want["probs"], how      # the good one, by its position
            assert len(j["warnings"]) == 1 and j["warnings"][0].startswith(f"{name} not used: "), j["warnings"]
            # and without skip: the same code, whichever way it came
            if how == "json":
                r = c.post("/v1/predict", json={"text": "x", "images": [_b64(good), _b64(bad)]})
            else:
                r = c.post("/v1/predict", data={"text": "x"}, files=[("images", ("ok.jpg", good, "image/jpeg")),
                                                                     ("images", ("bad.jpg", bad, "image/jpeg"))])
            e = r.json()["error"]
            assert r.status_code in (413, 422) and e["code"] == code and e["field"] == "images[1]", (how, e)
            assert "on_bad_image='skip'" in e["hint"] and e["message"].startswith("Image 2")
        r = c.post("/v1/predict/batch", json={"posts": [{"text": "a", "images": [_b64(bad)], "on_bad_image": "skip"},
                                                        {"text": "b", "images": [_b64(bad)]}]})
        assert r.status_code in (413, 422) and r.json()["error"]["field"] == "posts[1].images[0]"


# -- 5: client disconnects -----------------------------------------------------------------------
def test_client_disconnect_mid_body_is_one_line_and_499(live):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = Keep(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("sgmft.serve", "uvicorn.error")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
    try:
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n")
        raw_http(live.port, head + b'{"text": "' + b"x" * 5000, read=False)
        import time

        deadline = time.time() + 10
        while not any("disconnected" in r.getMessage() for r in records) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        for lg, lv in zip(loggers, old):
            lg.removeHandler(h)
            lg.setLevel(lv)
    mine = [r for r in records if "disconnected" in r.getMessage()]
    assert len(mine) == 1 and "\n" not in mine[0].getMessage() and mine[0].exc_info is None
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage() for r in records]
    metrics = raw_http(live.port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").decode()
    assert _metric(metrics, "/v1/predict", "499") == 1 and _metric(metrics, "/v1/predict", "500") == 0


# -- 6: exposure: Host, CORS ---------------------------------------------------------------------
def test_allowed_hosts(pp, live):
    ans = raw_http(live.port, b"GET /v1/health HTTP/1.1\r\nHost: rebind.attacker.example\r\nConnection: close\r\n\r\n")
    assert _status(ans) == 400 and b"host_not_allowed" in ans
    for host in (b"127.0.0.1", f"127.0.0.1:{live.port}".encode(), b"localhost", b"[::1]:80"):
        ans = raw_http(live.port, b"GET /v1/health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert _status(ans) == 200, host
    assert ServeConfig().hosts("10.1.2.3") == ["localhost", "127.0.0.1", "::1", "10.1.2.3"]
    with _client(pp, allowed_hosts="api.example.com,*.internal") as c:
        assert c.get("/v1/health", headers={"host": "api.example.com"}).status_code == 200
        assert c.get("/v1/health", headers={"host": "a.b.internal:8000"}).status_code == 200
        assert c.get("/v1/health", headers={"host": "127.0.0.1"}).status_code == 400


def test_cors_closed_by_default_and_open_when_asked(pp):
    pre = {"origin": "https://app.example.com", "access-control-request-method": "POST",
           "access-control-request-headers": "content-type"}
    with _client(pp) as c:
        r = c.post("/v1/predict", json={"text": "看电影"}, headers={"origin": "https://app.example.com"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        r = c.post("/v1/predict", data={"text": "看电影"}, headers={"origin": "https://evil.example"})
        assert r.status_code == 403                                      # a cross-origin form post: refused
        assert c.options("/v1/predict", headers=pre).status_code == 403
        r = c.post("/v1/predict", json={"text": "看电影"}, headers={"origin": BASE})     # the page itself
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with _client(pp, cors_origins="https://app.example.com") as c:
        r = c.options("/v1/predict", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        r = c.post("/v1/predict", json={"text": "看电影"}, headers={"origin": "https://app.example.com"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        assert c.post("/v1/predict", json={"text": "x"}, headers={"origin": "https://evil.example"}).status_code == 403


# -- 7: one error per cause, for a person ---------------------------------------------------------
def test_one_error_per_cause_in_every_form(pp):
    with _client(pp) as c:
        big = "看" * (1024 * 1024 // 3 + 10)                                    # over 1 MiB of UTF-8
        for r in (c.post("/v1/predict", json={"text": big}), c.post("/v1/predict", data={"text": big})):
            e = r.json()["error"]
            assert r.status_code == 422 and e["code"] == "text_too_long" and e["limit"] == 5000, e
        e = c.post("/v1/predict", json={"text": "x", "images": [_b64(png_claiming(20_000, 20_000))]}).json()["error"]
        assert e["code"] == "image_pixels_too_large" and e["limit"] == 40_000_000
        assert "40,000,000" in e["message"] and "178" not in e["message"]        # our limit, not PIL's
        mime = base64.encodebytes(png_bytes()).decode()                          # wrapped at 76 columns
        assert "\n" in mime and c.post("/v1/predict", json={"text": "x", "images": [mime]}).status_code == 200
        e = c.post("/v1/predict", json={"text": "x", "images": ["x" * 30]}).json()["error"]
        assert e["code"] == "bad_base64" and "never as paths" in e["message"]
        e = c.post("/v1/predict", json={"text": "x", "images": [_b64(b"\0" * 10)] * 2}).json()["error"]
        assert e["message"] == ("Image 1 is not an image file (its format is not recognised). Send a JPEG, PNG, "
                                "GIF, WebP or BMP file, or leave it out.")
        for path in ("/v1/health", "/v1/ready"):
            assert c.head(path).status_code == 200


# -- 9: draining and Retry-After ----------------------------------------------------------------
def test_retry_after_from_the_queue():
    from concurrent.futures import ThreadPoolExecutor

    from sgmft.serve.batching import Batcher

    b = Batcher("t", lambda items: items, ThreadPoolExecutor(1), max_batch=32, max_wait_ms=0, max_queue=512)
    b._batch_s = 0.1                                    # 0.1 s a forward: a full queue clears in 1.6 s
    b._q = type("Q", (), {"qsize": lambda self: 512})()
    assert b.retry_after(1) == 1                        # one forward makes room
    assert b.retry_after(64) == 1                       # two forwards, 0.2 s
    b.running = 32
    b._batch_s = 0.8
    assert b.retry_after(64) == 3                       # the running one + two: 2.4 s -> 3
    b._batch_s = 0.0
    assert b.retry_after(1) == 1                        # no history yet: at least 1 s


def test_ready_is_503_during_the_drain_grace_while_requests_are_served(pp):
    import asyncio

    app = create_app(pp)
    svc = app.state.service
    with TestClient(app, base_url=BASE) as c:
        svc.ready = False                               # what SIGTERM does first (server.DrainingServer)
        assert c.get("/v1/ready").status_code == 503 and c.head("/v1/ready").status_code == 503
        assert c.post("/v1/predict", json={"text": "看电影"}).status_code == 200    # still served in the grace
        c.portal.call(lambda: svc.drain(5))
        r = c.post("/v1/predict", json={"text": "看电影"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert asyncio
