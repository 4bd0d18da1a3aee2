"""Shared by the service tests: a tiny trained run (tiny random Chinese-CLIP, 80 SimPosts, 2 epochs)
made by `sgmft demo-raw`, and a few image payloads."""

from __future__ import annotations

import io
import json
import socket
import struct
import zlib
from pathlib import Path

import pytest


def build_tiny_run(root: Path) -> dict:
    """``sgmft demo-raw`` into ``root`` (about 10 s on 2 cores); returns the run and some posts."""
    from sgmft.cli import main
    from sgmft.ingest.manifest import read_manifest

    assert main(["demo-raw", "--out", str(root), "--posts", "80", "--epochs", "2", "--threads", "1",
                 "--no-progress"]) == 0
    posts, _ = read_manifest(root / "simposts" / "manifest.jsonl")
    return {"root": root, "run": root / "run", "posts": posts,
            "results": json.loads((root / "results.json").read_text(encoding="utf-8"))}


_SHARED: dict = {}


def shared_tiny_run(tmp_path_factory) -> dict:
    """:func:`build_tiny_run` once per test session, shared by the service test modules (read only)."""
    if "run" not in _SHARED:
        _SHARED["run"] = build_tiny_run(tmp_path_factory.mktemp("serve-run"))
    return _SHARED["run"]


def reuse_demo(root: Path) -> dict:
    """The same dict for an existing ``sgmft demo-raw --out ROOT`` folder."""
    from sgmft.ingest.manifest import read_manifest

    posts, _ = read_manifest(root / "simposts" / "manifest.jsonl")
    return {"root": root, "run": root / "run", "posts": posts,
            "results": json.loads((root / "results.json").read_text(encoding="utf-8"))}


def png_bytes(w: int = 40, h: int = 30, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``w`` x ``h`` pixels (a decompression-bomb header; tiny file)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``sgmft.serve.server.make_server(app)`` on 127.0.0.1 in a thread of this process (the real
    uvicorn + httptools stack, header limit included); ``with LiveServer(app) as s: s.url``."""

    def __init__(self, app, **kw):
        from sgmft.serve.server import make_server

        self.port = free_port()
        self.server = make_server(app, "127.0.0.1", self.port, log_level="warning", **kw)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def raw_http(port: int, data: bytes, *, read: bool = True, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection to 127.0.0.1:``port``; the whole answer (until close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if not read:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out


def screenshots(demo: Path, out: Path, tag: str) -> list[Path]:
    """The page after a prediction (a post with 2+ images of a `sgmft demo-raw --out DEMO` folder) at
    1280 and 360 px, saved as ``serve-page-TAG-WIDTH.png`` (docs/img). Needs Chromium and playwright:

        python tests/serve_support.py DEMO docs/img after
    """
    import http.client
    import os
    import signal
    import subprocess
    import sys
    import time

    from playwright.sync_api import sync_playwright

    env = reuse_demo(demo)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sgmft.cli", "serve", str(env["run"]), "--port", str(port),
                             "--threads", "1"], env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    saved = []
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/v1/ready")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        post = next(p for p in env["posts"] if len(p.images) >= 2 and len(p.text) > 8)
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-dev-shm-usage"])
            for w in (1280, 360):
                page = b.new_page(viewport={"width": w, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_function("document.getElementById('model-info').textContent.includes('places')")
                page.fill("#text", post.text)
                page.set_input_files("#files", [str(x) for x in post.images])
                page.click("#predict")
                page.wait_for_selector("#results:not([hidden]) .bar-row.top")
                page.wait_for_timeout(500)
                saved.append(out / f"serve-page-{tag}-{w}.png")
                page.screenshot(path=str(saved[-1]), full_page=True)
                page.close()
            b.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return saved


if __name__ == "__main__":
    import sys

    print(screenshots(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))


# -- fixtures shared by the service's test modules (imported there by name) --------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield shared_tiny_run(tmp_path_factory)
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def pp(env):
    from sgmft.predict import PostPredictor

    return PostPredictor.load(env["run"])
