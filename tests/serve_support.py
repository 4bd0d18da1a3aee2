"""Shared by the service tests: a tiny trained run (tiny random Chinese-CLIP, 80 SimPosts, 2 epochs)
made by `sgmft demo-raw`, and a few image payloads."""

from __future__ import annotations

import io
import json
import socket
import struct
import zlib
from pathlib import Path


def build_tiny_run(root: Path) -> dict:
    """``sgmft demo-raw`` into ``root`` (about 10 s on 2 cores); returns the run and some posts."""
    from sgmft.cli import main
    from sgmft.ingest.manifest import read_manifest

    assert main(["demo-raw", "--out", str(root), "--posts", "80", "--epochs", "2", "--threads", "1",
                 "--no-progress"]) == 0
    posts, _ = read_manifest(root / "simposts" / "manifest.jsonl")
    return {"root": root, "run": root / "run", "posts": posts,
            "results": json.loads((root / "results.json").read_text(encoding="utf-8"))}


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
