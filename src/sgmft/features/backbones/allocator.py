"""Keep freed activation memory in the process for the next batch (glibc ``mallopt``).

A ViT forward allocates and frees the same large activation tensors batch after batch (ViT-B/16 at
batch 32: 39 MB for each MLP activation in bf16, 77 MB in fp32). glibc serves blocks above its mmap
threshold (at most 32 MB by default) with a fresh ``mmap`` and returns them with ``munmap`` on free,
so every such tensor pays its page faults again on first touch: a bf16 ``x * 1.702`` over one of them
took 12.1 ms instead of 2.5 ms into a reused buffer, on a 2-core AMX machine (issue 22).

:func:`keep_freed_memory` raises the mmap threshold to 1 GiB and the trim threshold to its maximum,
so these blocks come from the heap and stay mapped when freed; the next batch reuses them without a
fault. Measured with ``benchmarks/bench_extract.py --precisions fp32,bf16,int8 --size base`` (32
posts, 2 threads, one quiet run each, docs/scale.md): fp32 4.97 -> 5.85 posts/s, bf16 17.99 ->
22.09, int8 11.76 -> 16.51. Features are bit-identical (only where memory comes from changes).

The cost: the process keeps its high-water mark of freed heap memory instead of returning it, which
is what a long extraction or a server wants. It is called after a backbone is loaded (the transient
fp32 copy of a reduced-precision load is freed before, the normal way), once per process, on CPU
only. ``SGMFT_MALLOC=system`` leaves glibc's defaults alone. Elsewhere than Linux/glibc it does nothing.

**Not in the HTTP service.** ``sgmft serve`` (and :func:`sgmft.serve.load_app`) keep glibc's
defaults (:func:`serving_default`): the service decodes large uploaded images in threads, and with
the tuning, while a post with two 6300 x 6300 PNGs was decoded (4.4-5.0 s either way), a small
``/v1/predict`` sent meanwhile waited up to 1.6-2.6 s (4 runs) instead of 0.47-0.53 s (3 runs), and
about a quarter as many of them were answered (``benchmarks/bench_serve.py``, its hostile cases,
2026-12-04). ``SGMFT_MALLOC=keep`` turns the tuning on there too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "allocator_plan", "allocator_state", "keep_freed_memory", "serving_default"]


def serving_default() -> None:
    """In a server process: keep glibc's defaults unless ``SGMFT_MALLOC`` says otherwise (docstring)."""
    os.environ.setdefault("SGMFT_MALLOC", "system")

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3    # <malloc.h>
MMAP_THRESHOLD = 1 << 30          # blocks below 1 GiB come from the heap
TRIM_THRESHOLD = 2**31 - 1        # never give the top of the heap back (mallopt takes a C int)
TOP_PAD = 256 << 20               # grow the heap 256 MiB at a time

_state: dict = {"tuned": False, "reason": "not requested yet"}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Tune glibc once for this process (module docstring); True when it is (now or before)."""
    if _state["tuned"]:
        return True
    if os.environ.get("SGMFT_MALLOC", "").strip().lower() == "system":
        _state["reason"] = "SGMFT_MALLOC=system: glibc defaults kept"
        return False
    libc = _libc()
    if libc is None:
        _state["reason"] = "not glibc: allocator left as it is"
        return False
    ok = all(libc.mallopt(opt, val) == 1 for opt, val in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                          (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                          (M_TOP_PAD, TOP_PAD)))
    _state.update(tuned=ok, reason="glibc keeps freed blocks below 1 GiB for reuse (mallopt)" if ok
                  else "glibc refused mallopt: defaults kept")
    return ok


def allocator_state() -> dict:
    """``{"tuned": bool, "reason": str}`` for reports (bench_extract, --explain-hardware)."""
    return dict(_state)


def allocator_plan() -> str:
    """One line for ``--explain-hardware``: what loading a CPU backbone will do to the allocator."""
    if os.environ.get("SGMFT_MALLOC", "").strip().lower() == "system":
        return "glibc defaults (SGMFT_MALLOC=system)"
    if _libc() is None:
        return "left as it is (not glibc)"
    return ("glibc keeps freed blocks below 1 GiB for the next batch (mallopt, set when a CPU backbone "
            "loads; SGMFT_MALLOC=system keeps the defaults)")
