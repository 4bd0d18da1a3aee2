"""Benchmark ``sgmft serve``: HTTP throughput and latency against in-process ``PostPredictor``.

Prints one JSON object (and writes it with ``--out``). In one run, on the same posts:

* **in-process**: ``PostPredictor.predict_post`` one post at a time, and
  ``PostPredictor.predict_posts`` in batches of ``--batch-size`` (what the server's dynamic
  batching can reach at best); ``Predictor.predict_features`` likewise for feature vectors;
* **server**: ``sgmft serve`` in its own process on 127.0.0.1, driven by C concurrent
  keep-alive clients (C = 1, 8, 32 by default) for ``--seconds`` each: raw posts
  (``POST /v1/predict``, base64 JSON, one post per request) and feature vectors
  (``POST /v1/predict/features``, one post per request). Throughput, p50 and p99 latency;
* **hostile** (``--hostile``, on by default): a 1 MiB request header (time to the 431, and the
  slowest ``/v1/health`` meanwhile); the 16 posts x 9 single-colour 6300x6300 PNGs batch of
  issue 21 (refused by the pixel budget) and a 2 x 6300x6300 post (decoded, off the inference
  thread), each with the slowest small ``/v1/predict`` sent meanwhile;
* **soak**: ``--soak-seconds`` (default 120) of raw-post load at concurrency
  ``--soak-concurrency``; error count and the server's RSS (from /proc) after warm-up, at
  the end and at its peak.

``ratio`` = server posts/s at concurrency 32 / in-process posts/s (targets: >= 0.7 against
one-post-at-a-time prediction; the batched figure is reported too). Every client loop is
bounded by time and stops by itself; traffic goes only to 127.0.0.1.

The load generator is a minimal HTTP/1.1 keep-alive client on asyncio streams (request
bytes built once per post), so the client spends as little of the shared CPU as possible.
By default the run is built here with ``sgmft demo-raw`` (tiny RANDOM Chinese-CLIP);
``--run`` serves an existing one (its ``simposts/`` posts or ``--manifest``).

    python benchmarks/bench_serve.py [--run DIR] [--seconds 8] [--soak-seconds 120] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# -- a minimal keep-alive HTTP/1.1 client (benchmark tooling only) ----------------------------------
class Conn:
    def __init__(self, host: str, port: int):
        self.host, self.port, self.r, self.w = host, port, None, None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        self.w.write(raw)
        await self.w.drain()
        head = await self.r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length, close = 0, False
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection" and v.strip().lower() == "close":
                close = True
        body = await self.r.readexactly(length)
        if close:
            self.close()
        return status, body

    def close(self):
        if self.w is not None:
            self.w.close()
        self.r = self.w = None


class _Reader(asyncio.Protocol):
    """Collects one HTTP/1.1 response at a time: (status, body) once its Content-Length bytes are in."""

    def __init__(self):
        self.buf, self.fut, self.transport, self.lost = bytearray(), None, None, None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.fut is None or self.fut.done():
            return
        head = bytes(self.buf[:end]).lower()
        i = head.find(b"content-length:")
        length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        status = int(self.buf[9:12])
        body = bytes(self.buf[end + 4:end + 4 + length])
        del self.buf[:end + 4 + length]
        self.fut.set_result((status, body, b"connection: close" in head))

    def connection_lost(self, exc):
        self.lost = exc or ConnectionError("the server closed the connection")
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(self.lost)


class LeanConn:
    """The same keep-alive client as :class:`Conn` on a bare asyncio Protocol: no stream objects, no
    task per request, so a request costs the load generator a few microseconds of the shared CPU."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.p = host, port, None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        if self.p is None or self.p.lost is not None:
            _, self.p = await loop.create_connection(_Reader, self.host, self.port)
        self.p.fut = loop.create_future()
        self.p.transport.write(raw)
        status, body, close = await self.p.fut
        if close:
            self.close()
        return status, body

    def close(self):
        if self.p is not None and self.p.transport is not None:
            self.p.transport.close()
        self.p = None


def post_request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


CLIENT = {"lean": LeanConn, "streams": Conn}
CLIENT_KIND = ["lean"]                                                 # --client


async def drive(host, port, requests: list[bytes], concurrency: int, seconds: float, max_requests: int):
    """C workers send ``requests`` round-robin until ``seconds`` pass or ``max_requests`` are sent."""
    lat, errors, sent = [], [], [0]
    deadline = time.perf_counter() + seconds
    make = CLIENT[CLIENT_KIND[0]]

    async def worker(k: int):
        conn, i = make(host, port), k
        try:
            while time.perf_counter() < deadline and sent[0] < max_requests:
                sent[0] += 1
                raw = requests[i % len(requests)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    async with asyncio.timeout(60):
                        status, body = await conn.request(raw)
                    if status != 200 or b'"label"' not in body:
                        errors.append(f"{status}: {body[:200]!r}")
                    else:
                        lat.append(time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(e).__name__}: {e}")
                    conn.close()
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    return lat, errors, wall


def summarize(lat, errors, wall) -> dict:
    import numpy as np

    a = np.sort(np.asarray(lat)) * 1000 if lat else np.zeros(1)
    return {"requests": len(lat) + len(errors), "ok": len(lat), "errors": len(errors),
            "posts_per_s": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "seconds": round(wall, 2),
            "error_examples": sorted(set(errors))[:3]}


def rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its children (the worker processes of ``--workers``), from /proc."""
    total = 0.0
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                total += float(line.split()[1]) / 1024
    for t in Path(f"/proc/{pid}/task").iterdir():
        for child in (t / "children").read_text().split():
            try:
                total += rss_mb(int(child))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(host, port) -> dict:
    import http.client

    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("sgmft_batch_size_sum") or line.startswith("sgmft_batch_size_count"):
            name, val = line.rsplit(" ", 1)
            out[name] = float(val)
    return out


# -- hostile clients (issue 21's acceptance) -----------------------------------------------------------
async def _timed(host, port, raw: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    c = Conn(host, port)
    try:
        status, _ = await asyncio.wait_for(c.request(raw), 120)
    except (ConnectionError, asyncio.IncompleteReadError):
        status = 0                                                     # closed without an answer
    finally:
        c.close()
    return status, time.perf_counter() - t0


async def _while_probing(host, port, heavy, probe: bytes, delay: float = 0.0):
    """Run ``heavy`` (a coroutine) while ``probe`` is sent again and again; (heavy's result, probe latencies)."""
    lat, done = [], asyncio.Event()

    async def prober():
        await asyncio.sleep(delay)
        while not done.is_set():
            _, dt = await _timed(host, port, probe)
            lat.append(dt)
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(prober())
    try:
        out = await heavy
        if not lat:                                                    # at least one probe overlaps
            await asyncio.sleep(0.05)
    finally:
        done.set()
        await task
    return out, lat


def hostile(host: str, port: int) -> dict:
    """A 1 MiB header against /v1/health probes; the issue's 16 x 9 x 6300^2 batch, and a heavy but
    allowed request (2 x 6300^2 PNGs, decoded), each against a small /v1/predict sent meanwhile."""
    import io

    from PIL import Image

    health = f"GET /v1/health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    big_head = f"GET /v1/health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Big: ".encode() + b"a" * 2**20 + b"\r\n\r\n"
    out: dict = {"header_1mib": []}
    for _ in range(5):
        (status, dt), lat = asyncio.run(_while_probing(host, port, _timed(host, port, big_head), health))
        out["header_1mib"].append({"status": status, "ms": round(dt * 1000, 1),
                                   "health_max_ms": round(max(lat) * 1000, 1) if lat else None})
    buf = io.BytesIO()
    Image.new("RGB", (6300, 6300), (200, 30, 30)).save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    small = post_request(host, port, "/v1/predict", json.dumps({"text": "周末和朋友去看电影"}).encode())
    cases = {"batch_16x9_6300px": post_request(host, port, "/v1/predict/batch", json.dumps(
                 {"posts": [{"text": "x", "images": [b64] * 9}] * 16}).encode()),
             "post_2_6300px_decoded": post_request(host, port, "/v1/predict", json.dumps(
                 {"text": "x", "images": [b64] * 2}).encode())}
    for name, raw in cases.items():
        (status, dt), lat = asyncio.run(_while_probing(host, port, _timed(host, port, raw), small, 0.05))
        out[name] = {"status": status, "request_bytes": len(raw), "ms": round(dt * 1000, 1),
                     "small_predict_max_ms": round(max(lat) * 1000, 1) if lat else None,
                     "small_predicts": len(lat)}
    return out


def _median(rounds: list[dict]) -> float:
    r = sorted(x["ratio"] for x in rounds)
    return r[len(r) // 2] if len(r) % 2 else round((r[len(r) // 2 - 1] + r[len(r) // 2]) / 2, 3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a trained run directory (default: build one with `sgmft demo-raw`)")
    ap.add_argument("--manifest", help="posts to send (default: the run's demo SimPosts)")
    ap.add_argument("--demo-posts", type=int, default=200, help="SimPosts for the run built here")
    ap.add_argument("--posts", type=int, default=64, help="distinct posts sent (cycled)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=8.0, help="load per concurrency level")
    ap.add_argument("--max-requests", type=int, default=20000, help="cap per level")
    ap.add_argument("--soak-seconds", type=float, default=120.0)
    ap.add_argument("--soak-concurrency", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32, help="server --max-batch-size and the in-process batch")
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=1, help="sgmft serve --workers (server processes on one port)")
    ap.add_argument("--server-batch-size", type=int,
                    help="the server's --max-batch-size (default: --batch-size); with N workers at concurrency C, "
                         "about C/N, so that a worker's batch fills without waiting --max-wait-ms")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the server")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved in-process/server rounds for the c32 ratios")
    ap.add_argument("--hostile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time hostile requests (a 1 MiB header, 6300^2 PNG images) against small ones")
    ap.add_argument("--client", choices=sorted(CLIENT), default="lean",
                    help="load generator: lean (asyncio Protocol) or streams (asyncio streams, the earlier client)")
    ap.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="the load generator's event loop (uvloop, as the server's, or the standard one)")
    ap.add_argument("--out", help="also write the JSON here (atomically)")
    args = ap.parse_args(argv)
    CLIENT_KIND[0] = args.client
    if args.client_loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(c) for c in args.concurrency.split(",")]

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from sgmft.ingest.images import ImageBytes
    from sgmft.ingest.manifest import read_manifest
    from sgmft.predict import PostPredictor

    tmp = tempfile.TemporaryDirectory(prefix="sgmft-bench-serve-")
    run = Path(args.run) if args.run else None
    if run is None:
        demo = Path(tmp.name) / "demo"
        r = subprocess.run([sys.executable, "-m", "sgmft.cli", "demo-raw", "--out", str(demo), "--posts",
                            str(args.demo_posts), "--epochs", "5", "--threads", str(args.threads), "--no-progress"],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stdout + r.stderr)
        run = demo / "run"
    manifest = Path(args.manifest) if args.manifest else run.parent / "simposts" / "manifest.jsonl"
    posts, _ = read_manifest(manifest, on_error="skip")
    posts = posts[:args.posts]
    raw = [(p.text, [ImageBytes(Path(x).read_bytes(), Path(x).name) for x in p.images]) for p in posts]

    # -- in-process, same posts ---------------------------------------------------------------------
    pp = PostPredictor.load(run, batch_size=args.batch_size)
    pp.predict_posts(raw[:8])                                          # warm-up
    reps = max(1, 512 // len(raw))

    def timed(fn):
        t0 = time.perf_counter()
        n = fn()
        return n / (time.perf_counter() - t0)

    one = timed(lambda: sum(1 for _ in range(reps) for t, ims in raw if pp.predict_post(t, ims)))
    batched = timed(lambda: sum(len(pp.predict_posts(raw)) for _ in range(reps)))
    from sgmft.features.encode import encode_posts
    from sgmft.ingest.manifest import Post

    e = encode_posts(pp.backbone, pp.cleaner, [Post(str(i), "", t, tuple(ims), None, None, 0)
                                               for i, (t, ims) in enumerate(raw)], pp.image_choice)
    pred = pp.predictor
    feats = [(e.text[i] if e.text_mask[i] else None, e.image[i] if e.image_mask[i] else None) for i in range(len(raw))]
    f_reps = max(1, 4096 // len(raw))

    def feat_one():
        for _ in range(f_reps):
            for i in range(len(raw)):
                pred.predict_features(e.text[i:i + 1], e.image[i:i + 1], e.text_mask[i:i + 1], e.image_mask[i:i + 1])
        return f_reps * len(raw)

    def feat_pass():
        for s in range(0, len(raw), args.batch_size):
            sl = slice(s, s + args.batch_size)
            pred.predict_features(e.text[sl], e.image[sl], e.text_mask[sl], e.image_mask[sl])
        return len(raw)

    def feat_batched():
        return sum(feat_pass() for _ in range(f_reps))

    f_one, f_batched = timed(feat_one), timed(feat_batched)
    inproc = {"raw_one_post_per_s": round(one, 1), "raw_batched_per_s": round(batched, 1),
              "features_one_post_per_s": round(f_one, 1), "features_batched_per_s": round(f_batched, 1)}
    all_threads = args.threads * args.workers
    if all_threads > args.threads:   # the server's cores all given to one in-process predictor, for fairness
        torch.set_num_threads(all_threads)
        inproc[f"features_batched_per_s_{all_threads}_threads"] = round(timed(feat_batched), 1)
        inproc[f"raw_batched_per_s_{all_threads}_threads"] = round(
            timed(lambda: sum(len(pp.predict_posts(raw)) for _ in range(reps))), 1)
        torch.set_num_threads(args.threads)
    print(json.dumps({"in_process": inproc}), file=sys.stderr, flush=True)

    # -- the server ---------------------------------------------------------------------------------
    host, port = "127.0.0.1", free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(args.threads)}
    log = open(Path(tmp.name) / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sgmft.cli", "serve", str(run), "--host", host, "--port", str(port),
                             "--threads", str(args.threads), "--max-batch-size", str(args.server_batch_size or args.batch_size),
                             "--workers", str(args.workers),
                             "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(max(512, 2 * args.batch_size * max(levels))),
                             "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import http.client

        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection(host, port, timeout=5)
                c.request("GET", "/v1/ready")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("sgmft serve did not start:\n" + Path(log.name).read_text())
            time.sleep(0.2)

        raw_reqs = [post_request(host, port, "/v1/predict", json.dumps(
            {"text": t, "images": [base64.b64encode(im.data).decode() for im in ims]}).encode()) for t, ims in raw]
        feat_reqs = [post_request(host, port, "/v1/predict/features", json.dumps(
            {"posts": [{"text": None if t is None else t.tolist(), "image": None if i is None else i.tolist()}]}
        ).encode()) for t, i in feats]

        def level(reqs, c, seconds):
            return summarize(*asyncio.run(drive(host, port, reqs, c, seconds, args.max_requests)))

        k = args.batch_size                                            # feature posts per request, batched kind
        feat_batch_reqs = [post_request(host, port, "/v1/predict/features", json.dumps({"posts": [
            {"text": None if t is None else t.tolist(), "image": None if i is None else i.tolist()}
            for t, i in (feats * 2)[s:s + k]]}).encode()) for s in range(0, len(feats), k)]

        level(raw_reqs, 8, 2.0)                                        # warm-up
        level(feat_reqs, 8, 1.0)
        server = {"raw": {}, "features": {}, f"features_{k}_per_request": {}}
        for c in levels:
            server["raw"][str(c)] = level(raw_reqs, c, args.seconds)
            server["features"][str(c)] = level(feat_reqs, c, args.seconds)
            fb = level(feat_batch_reqs, c, args.seconds)
            fb["posts_per_s"] = round(fb["posts_per_s"] * k, 1)        # requests/s x posts per request
            fb["requests_per_s"] = round(fb["posts_per_s"] / k, 1)
            server[f"features_{k}_per_request"][str(c)] = fb
            print(json.dumps({"concurrency": c, "raw": server["raw"][str(c)]["posts_per_s"],
                              "features": server["features"][str(c)]["posts_per_s"],
                              f"features_{k}_per_request": fb["posts_per_s"]}), file=sys.stderr, flush=True)
        m = scrape(host, port)
        mean_batch = {q: round(m.get(f'sgmft_batch_size_sum{{queue="{q}"}}', 0)
                               / max(1.0, m.get(f'sgmft_batch_size_count{{queue="{q}"}}', 1)), 2)
                      for q in ("posts", "features")}

        # -- the c32 ratios, interleaved: in-process and server alternate in short rounds, so that
        # the load of a shared machine weighs on both sides alike; the median ratio is reported
        def for_seconds(fn, seconds):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                n += fn()
            return n / (time.perf_counter() - t0)

        half, top_c = args.seconds / 2, max(levels)
        inter = {"raw": [], "features": []}
        for _ in range(args.rounds):
            a = for_seconds(lambda: len(pp.predict_posts(raw)), half)
            b = level(raw_reqs, top_c, half)["posts_per_s"]
            inter["raw"].append({"in_process_batched": round(a, 1), "server": b, "ratio": round(b / a, 3)})
            a = for_seconds(feat_pass, half)
            b = level(feat_reqs, top_c, half)["posts_per_s"]
            inter["features"].append({"in_process_batched": round(a, 1), "server": b, "ratio": round(b / a, 3)})
        print(json.dumps({"interleaved": inter}), file=sys.stderr, flush=True)
        hostile_res = hostile(host, port) if args.hostile else None
        if hostile_res:
            print(json.dumps({"hostile": hostile_res}), file=sys.stderr, flush=True)

        # -- soak ---------------------------------------------------------------------------------
        soak = None
        if args.soak_seconds > 0:
            rss0 = rss_mb(proc.pid)
            samples, lat, errors, t_start = [rss0], [], [], time.perf_counter()
            while time.perf_counter() - t_start < args.soak_seconds:
                chunk = min(10.0, args.soak_seconds - (time.perf_counter() - t_start))
                l, er, _ = asyncio.run(drive(host, port, raw_reqs, args.soak_concurrency, chunk, 10 ** 9))
                lat += l
                errors += er
                samples.append(rss_mb(proc.pid))
            wall = time.perf_counter() - t_start
            soak = {**summarize(lat, errors, wall), "concurrency": args.soak_concurrency,
                    "rss_start_mb": round(rss0, 1), "rss_end_mb": round(samples[-1], 1),
                    "rss_peak_mb": round(max(samples), 1),
                    "rss_growth": round((samples[-1] - rss0) / rss0, 4), "rss_samples_mb": [round(x, 1) for x in samples]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = "killed"
        log.close()
        server_log = Path(log.name).read_text()[-2000:]
        tmp.cleanup()

    top = str(max(levels))
    res = {
        "benchmark": "bench_serve", "run": "demo-raw (tiny RANDOM Chinese-CLIP)" if not args.run else str(args.run),
        "posts": len(raw), "images_per_post": round(float(np.mean([len(ims) for _, ims in raw])), 2),
        "threads": args.threads, "max_batch_size": args.batch_size, "max_wait_ms": args.max_wait_ms,
        "workers": args.workers, "server_max_batch_size": args.server_batch_size or args.batch_size,
        "client": {"kind": args.client, "loop": args.client_loop},
        "in_process": inproc, "server": server, "server_mean_batch_size": mean_batch, "interleaved": inter,
        "hostile": hostile_res,
        "soak": soak,
        "ratios": {
            "raw_c32_vs_in_process_one_by_one": round(server["raw"][top]["posts_per_s"] / one, 3),
            "raw_c32_vs_in_process_batched": round(server["raw"][top]["posts_per_s"] / batched, 3),
            "features_c32_vs_in_process_one_by_one": round(server["features"][top]["posts_per_s"] / f_one, 3),
            "features_c32_vs_in_process_batched": round(server["features"][top]["posts_per_s"] / f_batched, 3),
            "raw_c32_vs_in_process_batched_interleaved_median": _median(inter["raw"]),
            "features_c32_vs_in_process_batched_interleaved_median": _median(inter["features"]),
            **({f"features_c32_vs_in_process_batched_{all_threads}_threads": round(
                server["features"][top]["posts_per_s"] / inproc[f"features_batched_per_s_{all_threads}_threads"], 3),
                f"raw_c32_vs_in_process_batched_{all_threads}_threads": round(
                server["raw"][top]["posts_per_s"] / inproc[f"raw_batched_per_s_{all_threads}_threads"], 3)}
               if all_threads > args.threads else {}),
            f"features_{args.batch_size}_per_request_c32_vs_in_process_batched": round(
                server[f"features_{args.batch_size}_per_request"][top]["posts_per_s"] / f_batched, 3)},
        "server_exit_code_after_sigterm": exit_code,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform()},
    }
    res["targets"] = {
        "raw_c32_ge_0.7_in_process_one_by_one": res["ratios"]["raw_c32_vs_in_process_one_by_one"] >= 0.7,
        "raw_c32_ge_0.7_in_process_batched": res["ratios"]["raw_c32_vs_in_process_batched_interleaved_median"] >= 0.7,
        "features_c32_ge_0.5_in_process_batched":
            res["ratios"]["features_c32_vs_in_process_batched_interleaved_median"] >= 0.5,
        "soak_zero_errors": soak is None or soak["errors"] == 0,
        "soak_rss_growth_lt_10pct": soak is None or soak["rss_growth"] < 0.10}
    if hostile_res:
        h = hostile_res
        res["targets"]["header_1mib_refused_lt_100ms"] = all(x["status"] in (431, 0) and x["ms"] < 100
                                                             for x in h["header_1mib"])
        res["targets"]["health_lt_200ms_meanwhile"] = all((x["health_max_ms"] or 0) < 200 for x in h["header_1mib"])
        res["targets"]["small_predict_delay_lt_500ms"] = all(
            (h[k]["small_predict_max_ms"] or 0) < 500 for k in ("batch_16x9_6300px", "post_2_6300px_decoded"))
    if exit_code != 0:
        res["server_log_tail"] = server_log
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        tmp_out = out.with_name(out.name + ".tmp")
        tmp_out.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp_out, out)
    return res


if __name__ == "__main__":
    main()
