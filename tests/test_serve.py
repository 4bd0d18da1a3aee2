"""`sgmft serve`: every endpoint and every bad-input case through FastAPI's TestClient, dynamic
batching, the bounded queue, draining, and a real SIGTERM to a real server process."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from serve_support import env, free_port, png_bytes, png_claiming, pp  # noqa: E402,F401  (env, pp: shared fixtures)
from sgmft.serve import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(pp):
    with TestClient(create_app(pp), base_url=BASE) as c:
        yield c


BASE = "http://127.0.0.1"      # an allowed Host (--allowed-hosts defaults to the bind address and localhost)


def _app(pp, **cfg):
    return TestClient(create_app(pp, ServeConfig(**cfg)), base_url=BASE)


def _multi_image_post(env):
    return next(p for p in env["posts"] if len(p.images) > 1 and p.text)


def _files(paths):
    return [("images", (Path(p).name, Path(p).read_bytes(), "application/octet-stream")) for p in paths]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _err(r, status, code, field=None, limit=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert e["code"] == code and e["message"], e
    if field is not None:
        assert e["field"] == field, e
    if limit is not None:
        assert e["limit"] == limit, e
    return e


# -- predictions ---------------------------------------------------------------------------------
def test_predict_multipart_equals_post_predictor(client, pp, env):
    p = _multi_image_post(env)
    want = pp.predict_post(p.text, [str(x) for x in p.images])
    r = client.post("/v1/predict", data={"text": p.text}, files=_files(p.images))
    assert r.status_code == 200, r.text
    got = r.json()
    assert list(got["probs"]) == pp.label_names
    np.testing.assert_allclose(list(got["probs"].values()), list(want["probs"].values()), atol=1e-6, rtol=0)
    assert got["label"] == want["label"] and got["text_used"] == want["text_used"]
    assert got["image_index"] == [str(x) for x in p.images].index(want["image_used"])
    assert got["image_name"] == Path(want["image_used"]).name
    assert got["text_mask"] and got["image_mask"] and got["warnings"] == []


def test_predict_base64_json_and_data_url(client, pp, env):
    p = _multi_image_post(env)
    want = pp.predict_post(p.text, [str(x) for x in p.images])
    imgs = [_b64(Path(x).read_bytes()) for x in p.images]
    imgs[0] = "data:image/jpeg;base64," + imgs[0]
    r = client.post("/v1/predict", json={"text": p.text, "images": imgs})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(list(r.json()["probs"].values()), list(want["probs"].values()), atol=1e-6, rtol=0)
    assert r.json()["image_name"] == f"image {r.json()['image_index'] + 1}"


def test_predict_text_only_and_image_only(client, pp, env):
    r = client.post("/v1/predict", json={"text": "周末和朋友去看电影，IMAX效果太震撼了！"})
    assert r.status_code == 200
    j = r.json()
    assert j["image_mask"] is False and j["image_index"] is None and any("text only" in w for w in j["warnings"])
    want = pp.predict_post("周末和朋友去看电影，IMAX效果太震撼了！", [])
    np.testing.assert_allclose(list(j["probs"].values()), list(want["probs"].values()), atol=1e-6, rtol=0)
    img = next(p for p in env["posts"] if p.images).images[0]
    r = client.post("/v1/predict", data={"text": ""}, files=_files([img]))
    assert r.status_code == 200 and r.json()["text_mask"] is False and r.json()["image_index"] == 0
    assert any("image only" in w for w in r.json()["warnings"])


def test_predict_batch(client, pp, env):
    posts = [p for p in env["posts"] if p.images][:5]
    body = {"posts": [{"text": p.text, "images": [_b64(Path(x).read_bytes()) for x in p.images]} for p in posts]
            + [{"text": "看电影"}]}
    r = client.post("/v1/predict/batch", json=body)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 6
    for p, got in zip(posts, preds):
        want = pp.predict_post(p.text, [str(x) for x in p.images])
        np.testing.assert_allclose(list(got["probs"].values()), list(want["probs"].values()), atol=1e-6, rtol=0)
    # a bad image in post 2 names the post and the image
    body["posts"][2]["images"] = [_b64(b"GIF89a not really")]
    e = _err(client.post("/v1/predict/batch", json=body), 422, "not_an_image", "posts[2].images[0]")
    assert e["message"].startswith("Image 1 of post 3 is not an image file")


def test_predict_features_equals_predictor(client, pp, env):
    from sgmft.features import FeatureStore

    fs = FeatureStore.open(env["root"] / "features")
    rows = range(6)
    posts = [{"text": fs.text[i].tolist() if fs.text_mask[i] else None,
              "image": fs.image[i].tolist() if fs.image_mask[i] else None} for i in rows]
    r = client.post("/v1/predict/features", json={"posts": posts})
    assert r.status_code == 200, r.text
    want = pp.predictor.predict_store(fs, indices=list(rows)).probs
    got = np.array([list(p["probs"].values()) for p in r.json()["predictions"]])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert all(p["warnings"] == [] for p in r.json()["predictions"] if p["text_mask"] and p["image_mask"])
    # unnormalised vector: a warning; missing both: a warning; wrong D / NaN: 422
    r = client.post("/v1/predict/features", json={"posts": [{"text": [1.0] * pp.predictor.dim}, {}]})
    w = [p["warnings"] for p in r.json()["predictions"]]
    assert "L2-normalised" in w[0][0] and "empty post" in w[1][0]
    _err(client.post("/v1/predict/features", json={"posts": [{"text": [0.1] * 5}]}), 422, "wrong_dimension",
         "posts[0].text", pp.predictor.dim)
    _err(client.post("/v1/predict/features", content=b'{"posts": [{"image": [NaN' + b', 0.1' * 31 + b']}]}',
                     headers={"content-type": "application/json"}), 422, "invalid_value", "posts[0].image[0]")
    _err(client.post("/v1/predict/features", json={"posts": [{"text": "abc"}]}), 422, "wrong_type", "posts[0].text")
    # strict numbers: no strings, no booleans, no Infinity
    d = pp.predictor.dim
    _err(client.post("/v1/predict/features", json={"posts": [{"text": ["1"] * d}]}), 422, "wrong_type",
         "posts[0].text[0]")
    _err(client.post("/v1/predict/features", json={"posts": [{"text": [True] * d}]}), 422, "wrong_type",
         "posts[0].text[0]")
    _err(client.post("/v1/predict/features", content=b'{"posts": [{"text": [Infinity' + b', 0.1' * (d - 1) + b']}]}',
                     headers={"content-type": "application/json"}), 422, "invalid_value", "posts[0].text[0]")


# -- service endpoints ---------------------------------------------------------------------------
def test_model_health_ready(client, pp, env):
    m = client.get("/v1/model").json()
    assert m["labels"] == pp.label_names and len(m["labels"]) == 8
    assert m["dim"] == pp.backbone.dim and m["preset"] == "sgmft"
    # no file-system paths unless --expose-paths (issue 21, item 6)
    folder = pp.backbone.spec.partition(":")[2]
    assert m["backbone"] == "chinese-clip:" + Path(folder).name and folder not in json.dumps(m)
    assert str(env["root"]) not in json.dumps(m)
    with _app(pp, expose_paths=True) as c:
        assert c.get("/v1/model").json()["backbone"] == pp.backbone.spec
    assert m["training"]["best_val_acc"] == pytest.approx(env["results"]["best_val_acc"])
    assert m["evaluation"]["test"]["accuracy"] == pytest.approx(env["results"]["test_accuracy"])
    assert m["limits"]["max_images_per_post"] == ServeConfig().max_images_per_post
    assert client.get("/v1/health").json() == {"status": "ok"}
    assert client.get("/v1/ready").json() == {"status": "ready"}
    for u in ("/v1/health", "/v1/ready"):            # HEAD too (load balancers), without a body
        r = client.head(u)
        assert r.status_code == 200 and r.content == b""


def test_metrics_prometheus_text(pp):
    from prometheus_client.parser import text_string_to_metric_families

    with _app(pp) as c:
        c.post("/v1/predict", json={"text": "看电影"})
        c.post("/v1/predict", json={"text": 1})
        c.get("/v1/health")
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    reqs = {(s.labels["endpoint"], s.labels["status"]): s.value for s in fams["sgmft_http_requests"].samples
            if s.name.endswith("_total")}
    assert reqs[("/v1/predict", "200")] == 1 and reqs[("/v1/predict", "422")] == 1
    assert reqs[("/v1/health", "200")] == 1
    lat = [s for s in fams["sgmft_http_request_duration_seconds"].samples
           if s.name.endswith("_count") and s.labels["endpoint"] == "/v1/predict"]
    assert lat[0].value == 2
    assert {s.labels["queue"] for s in fams["sgmft_queue_depth"].samples} == {"posts", "features"}
    bs = [s for s in fams["sgmft_batch_size"].samples if s.name.endswith("_count") and s.labels["queue"] == "posts"]
    assert bs[0].value == 1
    assert "sgmft_in_flight_requests" in fams


def test_docs_and_page_are_offline(client):
    html = client.get("/docs").text
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", html)
    assert urls and all(u.startswith("/") for u in urls), urls
    for u in urls:
        assert client.get(u).status_code == 200, u
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/predict/features", "/v1/model", "/v1/health",
            "/v1/ready"} <= set(spec["paths"])
    assert {"multipart/form-data", "application/json"} <= set(spec["paths"]["/v1/predict"]["post"]["requestBody"]
                                                               ["content"])
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert "/static/app.js" in refs and "/static/style.css" in refs
    for u in refs:
        assert u.startswith("/") or u.startswith("data:"), u
        if u.startswith("/static"):
            assert client.get(u).status_code == 200
    static = Path(__file__).parents[1] / "src" / "sgmft" / "serve" / "static"
    for f in static.iterdir():
        assert not re.search(r"https?://", f.read_text(encoding="utf-8")), f"{f.name} refers to the network"


# -- bad input -----------------------------------------------------------------------------------
def test_malformed_missing_wrong_type_unknown(client):
    _err(client.post("/v1/predict", content=b'{"text": "x",', headers={"content-type": "application/json"}),
         400, "malformed_json", "body")
    _err(client.post("/v1/predict/batch", content=b"[1, 2", headers={"content-type": "application/json"}),
         400, "malformed_json", "body")
    _err(client.post("/v1/predict", json={"images": []}), 422, "missing_field", "text")
    _err(client.post("/v1/predict/batch", json={}), 422, "missing_field", "posts")
    _err(client.post("/v1/predict/batch", json={"posts": [{"images": []}]}), 422, "missing_field", "posts[0].text")
    _err(client.post("/v1/predict", json={"text": 3}), 422, "wrong_type", "text")
    _err(client.post("/v1/predict", json={"text": "x", "images": "abc"}), 422, "wrong_type", "images")
    _err(client.post("/v1/predict", json={"text": "x", "images": [1]}), 422, "wrong_type", "images[0]")
    _err(client.post("/v1/predict", json=["x"]), 422, "wrong_type", "body")
    _err(client.post("/v1/predict", json={"text": "x", "imgs": []}), 422, "unknown_field", "imgs")
    _err(client.post("/v1/predict", json={"text": "x", "on_bad_image": "maybe"}), 422, "invalid_value",
         "on_bad_image")
    _err(client.post("/v1/predict", content=b"text=x", headers={"content-type": "text/plain"}), 415,
         "unsupported_media_type")
    # multipart
    _err(client.post("/v1/predict", data={"on_bad_image": "skip"},
                     files={"images": ("a.png", png_bytes(), "image/png")}), 422, "missing_field", "text")
    _err(client.post("/v1/predict", data={"text": "x"}, files={"dummy": ("d.txt", b"x")}), 422, "unknown_field",
         "dummy")
    _err(client.post("/v1/predict", data={"text": "x", "images": "/etc/hostname"},
                     files={"images": ("a.png", png_bytes(), "image/png")}), 422, "wrong_type")
    _err(client.post("/v1/predict", content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data"}),
         400, "malformed_multipart")
    _err(client.get("/v1/nothing-here"), 404, "not_found")
    # still serving
    assert client.post("/v1/predict", json={"text": "看电影"}).status_code == 200


def test_bad_images(client, env):
    good = Path(next(p for p in env["posts"] if p.images).images[0]).read_bytes()
    cases = [(b"this is not an image", 422, "not_an_image"),
             (b"", 422, "empty_image"),
             (good[: len(good) // 2], 422, "truncated_image"),
             (png_claiming(100_000, 100_000), 413, "image_pixels_too_large"),   # PIL's own bomb check
             (png_claiming(8_000, 6_000), 413, "image_pixels_too_large")]       # ours (48 Mpx > 40 Mpx)
    for data, status, code in cases:
        _err(client.post("/v1/predict", json={"text": "x", "images": [_b64(good), _b64(data)]}), status, code,
             "images[1]")
        _err(client.post("/v1/predict", data={"text": "x"},
                         files=[("images", ("ok.jpg", good, "image/jpeg")), ("images", ("bad.jpg", data, "image/jpeg"))]),
             status, code, "images[1]")
    e = _err(client.post("/v1/predict", json={"text": "x", "images": [_b64(png_claiming(8_000, 6_000))]}), 413,
             "image_pixels_too_large", "images[0]", ServeConfig().max_image_pixels)
    assert "8000x6000" in e["message"]
    # skip mode: predicted without the truncated image, with a warning
    r = client.post("/v1/predict", data={"text": "看电影", "on_bad_image": "skip"},
                    files=[("images", ("cut.jpg", good[: len(good) // 2], "image/jpeg"))])
    assert r.status_code == 200 and r.json()["image_mask"] is False
    assert any("cut.jpg" in w and "cut off" in w for w in r.json()["warnings"])
    assert client.post("/v1/predict", json={"text": "看电影"}).status_code == 200


def test_never_reads_a_server_path(client, env):
    """A path in a request is never opened: as JSON it is not base64, as a form field not a file."""
    img = str(Path(next(p for p in env["posts"] if p.images).images[0]).resolve())
    e = _err(client.post("/v1/predict", json={"text": "x", "images": [img]}), 422, "bad_base64", "images[0]")
    assert "never as paths" in e["message"]
    e = _err(client.post("/v1/predict", data={"text": "x", "images": img}), 422, "wrong_type", "images[0]")
    assert "never given as paths" in e["message"]
    # the static mounts serve their own folder only
    for u in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static-offline-docs/../core.py",
              "/static//etc/hostname"):
        r = client.get(u)
        assert r.status_code == 404 and "import" not in r.text, u
    # even the path of a real image that happens to be valid base64 is decoded as bytes, not opened
    real = Path(f"/tmp/sgmft{os.getpid() % 100000:05d}0")          # 16 characters of the base64 alphabet
    real.write_bytes(png_bytes())
    try:
        _err(client.post("/v1/predict", json={"text": "x", "images": [str(real)]}), 422, "not_an_image", "images[0]")
    finally:
        real.unlink()


def test_limits(pp, env):
    good = Path(next(p for p in env["posts"] if p.images).images[0]).read_bytes()
    with _app(pp, max_text_chars=10, max_images_per_post=2, max_image_bytes=len(good), max_image_pixels=1000,
              max_body_bytes=len(good) * 4, max_batch_posts=2) as c:
        _err(c.post("/v1/predict", json={"text": "x" * 11}), 422, "text_too_long", "text", 10)
        _err(c.post("/v1/predict", data={"text": "x" * 11}), 422, "text_too_long", "text", 10)
        _err(c.post("/v1/predict/batch", json={"posts": [{"text": "a"}, {"text": "x" * 11}]}), 422, "text_too_long",
             "posts[1].text", 10)
        _err(c.post("/v1/predict", json={"text": "x", "images": [_b64(png_bytes())] * 3}), 422, "too_many_images",
             "images", 2)
        _err(c.post("/v1/predict", data={"text": "x"}, files=[("images", ("a.png", png_bytes(), "image/png"))] * 3),
             422, "too_many_images", "images", 2)
        _err(c.post("/v1/predict", json={"text": "x", "images": [_b64(good + b"\0")]}), 413, "image_size_too_large",
             "images[0]", len(good))
        _err(c.post("/v1/predict", data={"text": "x"}, files=[("images", ("big.jpg", good + b"\0", "image/jpeg"))]),
             413, "image_size_too_large", "images[0]", len(good))
        _err(c.post("/v1/predict", json={"text": "x", "images": [_b64(png_bytes(40, 30))]}), 413,
             "image_pixels_too_large", "images[0]", 1000)
        _err(c.post("/v1/predict/batch", json={"posts": [{"text": "a"}] * 3}), 422, "too_many_posts", "posts", 2)
        _err(c.post("/v1/predict/features", json={"posts": [{}] * 3}), 422, "too_many_posts", "posts", 2)
        big = {"text": "x", "images": [_b64(good)] * 2}
        body = json.dumps({"posts": [big] * 2}).encode()
        assert len(body) > len(good) * 4
        _err(c.post("/v1/predict/batch", content=body, headers={"content-type": "application/json"}), 413,
             "body_size_too_large", "body", len(good) * 4)
        # a chunked body (no Content-Length) is counted as it arrives
        _err(c.post("/v1/predict/batch", content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                    headers={"content-type": "application/json"}), 413, "body_size_too_large", "body", len(good) * 4)
        assert c.post("/v1/predict", json={"text": "看电影", "images": [_b64(png_bytes(20, 20))]}).status_code == 200


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_queue"):
        ServeConfig(max_queue=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        ServeConfig(max_wait_ms=-1)


# -- batching, the bounded queue, draining -------------------------------------------------------
class _Gate:
    """Wraps the posts batcher's function: records batch sizes, and can hold the inference thread."""

    def __init__(self, svc):
        self.fn, self.sizes, self.open = svc.posts.fn, [], threading.Event()
        self.open.set()
        svc.posts.fn = self

    def __call__(self, items):
        self.sizes.append(len(items))
        assert self.open.wait(30)
        return self.fn(items)


def _wait_for(cond, timeout=20):
    t = time.time() + timeout
    while not cond():
        assert time.time() < t, "timed out"
        time.sleep(0.01)


def _in_threads(c, n, body):
    out = [None] * n

    def go(i):
        out[i] = c.post("/v1/predict", json=body)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    return ts, out


def test_dynamic_batching_groups_requests(pp):
    app = create_app(pp, ServeConfig(max_batch_size=4, max_wait_ms=0))
    svc = app.state.service
    with TestClient(app, base_url=BASE) as c:
        gate = _Gate(svc)
        gate.open.clear()
        first, out1 = _in_threads(c, 1, {"text": "看电影"})
        _wait_for(lambda: svc.posts.running == 1)
        ts, out = _in_threads(c, 6, {"text": "吃饭"})           # queue while the first batch runs
        _wait_for(lambda: svc.posts.depth == 6)
        gate.open.set()
        for t in first + ts:
            t.join(30)
        assert all(r.status_code == 200 for r in out1 + out)
        assert gate.sizes == [1, 4, 2]                          # grouped, at most max_batch_size
        want = pp.predict_post("吃饭", [])["probs"]
        for r in out:
            np.testing.assert_allclose(list(r.json()["probs"].values()), list(want.values()), atol=1e-6, rtol=0)


def test_queue_full_is_503_with_retry_after(pp):
    app = create_app(pp, ServeConfig(max_batch_size=1, max_wait_ms=0, max_queue=2))
    svc = app.state.service
    with TestClient(app, base_url=BASE) as c:
        gate = _Gate(svc)
        gate.open.clear()
        # One at a time, so the queue never holds 3 before the worker takes the first (that race
        # refused the third request and left this test waiting on a CI machine):
        held, out = _in_threads(c, 1, {"text": "看电影"})
        _wait_for(lambda: svc.posts.running == 1)               # 1 running (held by the gate)
        more, out2 = _in_threads(c, 2, {"text": "看电影"})
        _wait_for(lambda: svc.posts.depth == 2)                 # + 2 waiting = full
        held = held + more
        r = c.post("/v1/predict", json={"text": "x"})
        e = _err(r, 503, "queue_full", limit=2)
        assert int(r.headers["Retry-After"]) >= 1
        r = c.post("/v1/predict/batch", json={"posts": [{"text": "a"}]})
        assert r.status_code == 503
        gate.open.set()
        for t in held:
            t.join(30)
        assert [x.status_code for x in out + out2] == [200, 200, 200]   # read after the joins
        assert c.post("/v1/predict", json={"text": "x"}).status_code == 200
        assert "max-queue" in e["hint"] and "Retry in" in e["message"]


def test_draining_refuses_new_requests_and_waits_for_in_flight(pp):
    import asyncio

    app = create_app(pp, ServeConfig(max_wait_ms=0))
    svc = app.state.service
    with TestClient(app, base_url=BASE) as c:
        gate = _Gate(svc)
        gate.open.clear()
        held, out = _in_threads(c, 1, {"text": "看电影"})
        _wait_for(lambda: svc.posts.running == 1)
        drained = c.portal.start_task_soon(lambda: svc.drain(10))
        _wait_for(lambda: svc.draining)
        r = c.post("/v1/predict", json={"text": "x"})
        _err(r, 503, "shutting_down")
        assert r.headers["Retry-After"] and r.headers["Connection"] == "close"
        assert c.get("/v1/ready").status_code == 503 and c.get("/v1/ready").json()["status"] == "draining"
        assert c.get("/v1/health").status_code == 200 and c.get("/metrics").status_code == 200
        assert not drained.done()                                # still waiting for the in-flight request
        gate.open.set()
        held[0].join(30)
        assert out[0].status_code == 200
        assert drained.result(10) is True
    assert asyncio  # (the drain ran on the TestClient's event loop)


@pytest.mark.slow   # ~15 s: starts a real server process
def test_sigterm_drains_a_real_server(env, tmp_path):
    """`sgmft serve` in its own process: SIGTERM while a request waits in the batcher -> /v1/ready is
    503 at once while requests are still served for --drain-seconds; after that a new request gets
    503; the requests in flight get their answers, and the process exits 0."""
    import http.client

    port = free_port()
    envv = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sgmft.cli", "serve", str(env["run"]), "--port", str(port),
                             "--max-wait-ms", "4000", "--max-batch-size", "8", "--threads", "1",
                             "--drain-seconds", "1.0"],
                            env=envv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def get(path):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", path)
        return c.getresponse().status

    try:
        deadline = time.time() + 90
        while True:
            try:
                if get("/v1/ready") == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            time.sleep(0.2)
        results = {}

        def slow(name):   # waits up to 4 s for batch-mates: in flight when SIGTERM comes
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.request("POST", "/v1/predict", body=json.dumps({"text": "看电影"}),
                      headers={"Content-Type": "application/json"})
            resp = c.getresponse()
            results[name] = (resp.status, json.loads(resp.read()))

        # a second, idle connection: the batch keeps waiting for a request from it (with every
        # open connection waiting for an answer, a batch would run at once)
        idle = socket.create_connection(("127.0.0.1", port))
        first = threading.Thread(target=slow, args=("before",))
        first.start()
        time.sleep(0.8)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert get("/v1/ready") == 503                               # the load balancer sees it at once
        second = threading.Thread(target=slow, args=("grace",))       # ... but requests are still served
        second.start()
        time.sleep(1.5)                                              # the grace is over
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("POST", "/v1/predict", body=json.dumps({"text": "x"}), headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        assert resp.status == 503 and json.loads(resp.read())["error"]["code"] == "shutting_down"
        for t in (first, second):
            t.join(30)
        idle.close()
        for name in ("before", "grace"):
            status, body = results[name]
            assert status == 200 and body["label"] in body["probs"], name
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert "draining (1 request(s) in flight; /v1/ready is 503 for 1 s" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    """The worker processes of ``pid`` (multiprocessing's resource tracker left out)."""
    kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


@pytest.mark.slow   # ~10 s
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
def test_a_stop_while_the_workers_still_load_exits_0(env):
    """SIGTERM to `sgmft serve --workers 2` while its workers still load the model: nothing is in flight,
    so the parent exits 0 (a worker that died of the forwarded signal was a crash, exit 1, before)."""
    envv = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sgmft.cli", "serve", str(env["run"]), "--port", str(free_port()),
                             "--workers", "2", "--log-level", "warning"],
                            env=envv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while len(_children(proc.pid)) < 2:
            assert proc.poll() is None and time.time() < deadline, "no workers"
            time.sleep(0.05)
        time.sleep(0.3)                              # the workers run, still importing and loading
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        out = proc.stdout.read()
        assert rc == 0, out
        assert "exited with status" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow   # ~30 s: starts a real server with two worker processes, twice
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
def test_workers_serve_one_port_and_stop_together(env, tmp_path):
    """`sgmft serve --workers 2`: two worker processes answer on one port; SIGTERM drains both and
    the parent exits 0. A worker that dies on its own stops the other, and the parent exits non-zero."""
    import http.client

    envv = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}

    def start():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "sgmft.cli", "serve", str(env["run"]), "--port", str(port),
                                 "--workers", "2", "--drain-seconds", "0.2", "--log-level", "warning"],
                                env=envv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                c.request("GET", "/v1/model")
                r = c.getresponse()
                if r.status == 200:
                    return proc, port, json.loads(r.read())["dim"]
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            time.sleep(0.3)

    proc, port, dim = start()
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        for k in range(6):                       # new connections: both workers answer on the port
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.request("POST", "/v1/predict/features", body=json.dumps({"posts": [{"text": [0.1 * k] * dim}]}),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            assert r.status == 200 and len(json.loads(r.read())["predictions"]) == 1
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        out = proc.stdout.read()
        assert rc == 0, out
        assert re.search(r"2 worker processes, \d+ torch thread\(s\) each", out), out
        # each worker drains, or, if the signal came while it still loaded the model, stops before serving
        assert len(re.findall(r"SIGTERM: (draining|stopping before serving)", out)) == 2, out
        assert not any(Path(f"/proc/{w}").exists() for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc, port, _ = start()                      # a worker killed: the service stops, non-zero
    try:
        os.kill(_children(proc.pid)[0], signal.SIGKILL)
        assert proc.wait(60) != 0
        assert "exited with status -9; stopping the others" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc, port, _ = start()                      # the parent killed: no worker is left serving
    workers = _children(proc.pid)
    proc.kill()
    proc.wait()
    def running(w):                              # not gone, and not a zombie nobody reaped yet
        try:
            return Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.time() + 30
    while any(running(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if running(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"orphaned workers {left}"


def test_cli_errors(capsys, tmp_path):
    from sgmft.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    assert main(["serve", str(tmp_path / "r"), "--max-queue", "0"]) == 2
    assert "serve options: --max-queue=0 is not allowed; expected a value > 0" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "r"), "--workers", "0"]) == 2
    assert "serve options: --workers=0 is not allowed; expected a value >= 1" in capsys.readouterr().err
    with socket.socket() as taken:                      # a port in use: one line, not a traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path / "r"), "--workers", "2", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    with socket.socket() as taken:                      # ... also when it was opened with SO_REUSEPORT
        taken.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", socket.SO_REUSEADDR), 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path / "r"), "--workers", "2", "--port", str(port)]) == 2
    assert "another server already listens there" in capsys.readouterr().err or not hasattr(socket, "SO_REUSEPORT")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out


def test_service_does_not_import_lightning(env):
    """Loading a run and building the app loads neither Lightning nor the training code nor the CLI."""
    code = ("import sys; from sgmft.serve import load_app; load_app(sys.argv[1]); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
            "'lightning_fabric') or m.startswith(('sgmft.train', 'sgmft.cli', 'sgmft.experiments'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    envv = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(env["run"])], env=envv, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_service_keeps_glibc_defaults_unless_told(env):
    """The server leaves glibc's allocator alone (large uploaded images decode slower with the
    extraction tuning, sgmft.features.backbones.allocator); SGMFT_MALLOC=keep turns it on."""
    code = ("import sys; from sgmft.serve import load_app; load_app(sys.argv[1]); "
            "from sgmft.features.backbones.allocator import allocator_state; print(allocator_state()['tuned'])")
    for mode, tuned in ((None, "False"), ("keep", "True")):
        envv = {k: v for k, v in os.environ.items() if k != "SGMFT_MALLOC"}
        envv.update({"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1",
                     **({"SGMFT_MALLOC": mode} if mode else {})})
        r = subprocess.run([sys.executable, "-c", code, str(env["run"])], env=envv, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == tuned, (mode, r.stdout + r.stderr)


def test_batcher_does_not_wait_when_no_request_can_come():
    """can_wait False (every open connection already waits for an answer): the batch runs at once
    instead of waiting max_wait_ms, so an item submitted later forms its own batch; with can_wait
    True the same two items share one batch. The service answers can_wait from the server's
    open connections and the requests waiting on a batcher."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from sgmft.serve.batching import Batcher

    def batches(can_wait):
        seen = []

        async def scenario():
            b = Batcher("t", lambda items: seen.append(list(items)) or list(items), ThreadPoolExecutor(1),
                        max_batch=8, max_wait_ms=2000, max_queue=8, can_wait=can_wait)
            first = asyncio.ensure_future(b.submit([1]))
            await asyncio.sleep(0.2)
            await asyncio.gather(first, b.submit([2]))
        asyncio.run(scenario())
        return seen

    assert batches(lambda: False) == [[1], [2]]
    assert batches(lambda: True) == [[1, 2]]

    class _Svc:   # the rule alone, on Service's method
        from sgmft.serve.service import Service
        _can_wait = Service._can_wait

    svc = _Svc()
    svc.open_connections, svc.waiting = None, 3
    assert svc._can_wait()                                    # no server (tests, ASGI): wait as configured
    svc.open_connections = lambda: 3
    assert not svc._can_wait()                                # all three connections wait for answers
    svc.open_connections = lambda: 4
    assert svc._can_wait()                                    # a fourth could still send one


def test_batcher_wait_size_bound_and_stop():
    """The Batcher alone: it waits max_wait_ms for batch-mates, never exceeds max_batch, refuses what
    does not fit in the queue, and a stop fails what is still queued instead of leaving it waiting."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from sgmft.serve.batching import Batcher, QueueFull

    gate, seen = threading.Event(), []

    def fn(items):
        seen.append(list(items))
        assert gate.wait(10)
        return [i * 10 for i in items]

    async def scenario():
        b = Batcher("t", fn, ThreadPoolExecutor(1), max_batch=3, max_wait_ms=300, max_queue=4)
        gate.set()
        first = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.05)                                 # within the wait: joins the same batch
        assert await asyncio.gather(first, b.submit([2, 3])) == [[10], [20, 30]]
        assert seen == [[1, 2, 3]]
        seen.clear()
        assert await b.submit([4, 5, 6, 7]) == [40, 50, 60, 70]  # max_batch 3 -> two forwards
        assert seen == [[4, 5, 6], [7]]
        gate.clear()
        running = asyncio.ensure_future(b.submit([8]))
        while b.running == 0:
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(b.submit([9, 10, 11, 12]))  # fills the queue (4)
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as e:
            await b.submit([13])
        assert e.value.limit == 4 and e.value.retry_after >= 1
        gate.set()
        assert await running == [80]
        assert await queued == [90, 100, 110, 120]
        gate.clear()
        blocked = asyncio.ensure_future(b.submit([14]))
        while b.running == 0:
            await asyncio.sleep(0.01)
        stranded = asyncio.ensure_future(b.submit([15]))
        await asyncio.sleep(0.01)
        await b.stop()
        with pytest.raises(RuntimeError, match="stopped"):
            await stranded
        # the request whose batch was running when stop() came gets an error too, never a hang:
        with pytest.raises(RuntimeError, match="stopped"):
            await asyncio.wait_for(blocked, 5)
        gate.set()

    asyncio.run(scenario())
