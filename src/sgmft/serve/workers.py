"""``sgmft serve --workers N``: N server processes answering on one listening socket.

One server process uses about one core, however many the machine has: parsing HTTP,
reading the JSON and the model's forward on a small batch all hold the interpreter lock.
Measured on a 2-core machine, one post per ``/v1/predict/features`` request at
concurrency 32: the server's threads together used 0.9-1.1 cores whatever the batch size
or wait, while the load generator used 0.12 (``benchmarks/bench_serve.py``; docs/serve.md).

With ``--workers N`` the parent reserves the port and starts N processes with
multiprocessing's ``spawn`` (no torch or thread state is forked). Each loads the run and
listens on the port with ``SO_REUSEPORT``, so that the kernel spreads new connections over
the workers by a hash of their addresses; a keep-alive connection stays with its worker.
(One listening socket shared by all, the fallback where ``SO_REUSEPORT`` is missing, gives
each connection to whichever worker wakes first: measured, one worker then took most of 32
keep-alive connections and throughput swung from round to round.) Each worker has its own batcher, queue,
``/metrics`` and ``/v1/ready`` (a scrape through the shared port sees one worker).

Signals: the workers leave the terminal's process group, so Ctrl-C reaches the parent
only; the parent passes SIGTERM and SIGINT on to every worker, each drains as a single
server does (:mod:`sgmft.serve.server`), and the parent exits 0 when all of them did (a worker
still loading its model has nothing in flight and stops at once, also with 0). If a
worker dies on its own, the parent stops the others and exits with that worker's status,
so that a supervisor (systemd, Kubernetes) restarts the whole service. If the parent dies
(SIGKILL, the OOM killer), each worker notices within a second and drains as on SIGTERM.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def _socket(host: str, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def bind(host: str, port: int, *, reuse_port: bool = False, listen: bool = True,
         backlog: int = 2048) -> socket.socket:
    """A socket bound to ``host:port`` (``port`` 0: a free one), listening unless ``listen`` is False."""
    sock = _socket(host, reuse_port)
    try:
        sock.bind((host, port))
    except OSError as e:
        from sgmft.errors import UserError

        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or "
                        "--host)") from None
    if listen:
        sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def reserve(host: str, port: int) -> tuple[socket.socket, bool]:
    """The parent's socket: with SO_REUSEPORT, bound but not listening (it holds the port and takes
    no connection; each worker listens on its own); without, the one listening socket all share."""
    reuse = hasattr(socket, "SO_REUSEPORT")
    if reuse and port and _someone_listens(host, port):   # SO_REUSEPORT would share it with them silently
        from sgmft.errors import UserError

        raise UserError(f"cannot listen on {host}:{port}: another server already listens there (choose "
                        "another --port or --host)")
    return bind(host, port, reuse_port=reuse, listen=not reuse), reuse


def _someone_listens(host: str, port: int) -> bool:
    probe = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((probe, port), timeout=1.0):
            return True
    except OSError:
        return False


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """SIGTERM this worker (it drains and exits) once its parent is gone, e.g. killed with SIGKILL:
    a worker in its own process group would otherwise go on serving the port as an orphan."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sgmft-parent-watch", daemon=True).start()


def _stop_before_serving(sig, frame) -> None:
    """SIGTERM/SIGINT while this worker still loads its model (before the server's own handlers): nothing
    is in flight, so it stops with status 0 instead of dying of the signal, which the parent would
    report as a crash (exit 1) although the stop was asked for."""
    print(f"sgmft serve: {signal.Signals(sig).name}: stopping before serving (nothing in flight)",
          file=sys.stderr, flush=True)
    raise SystemExit(0)


def _worker(target: Callable[..., Any], k: int, sock: socket.socket, reuse: bool, payload: Any,
            parent: int) -> None:
    os.setpgrp()                # Ctrl-C in the terminal reaches the parent, which passes it on
    for s in (signal.SIGTERM, signal.SIGINT):     # the server replaces these once it serves
        signal.signal(s, _stop_before_serving)
    _exit_with_parent(parent)
    if reuse:                   # this worker's own listening socket on the reserved port
        host, port = sock.getsockname()[:2]
        sock = bind(host, port, reuse_port=True)
    sys.exit(target(k, sock, payload) or 0)


def run_workers(n: int, host: str, port: int, target: Callable[..., Any], payload: Any) -> int:
    """Run ``target(k, listening_socket, payload)`` in ``n`` spawned processes until they end; the
    exit status. ``target`` must be importable (a module-level function) and serve the socket until
    a signal stops it."""
    sock, reuse = reserve(host, port)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(target, k, sock, reuse, payload, os.getpid()), name=f"sgmft-serve-{k}")
             for k in range(n)]
    stopping: list[int] = []

    def forward(sig, frame) -> None:
        stopping.append(sig)
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    crashed: int | None = None
    try:
        for p in procs:
            p.start()
        while any(p.exitcode is None for p in procs):
            mp.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=1.0)
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead and not stopping and crashed is None:
                crashed = dead[0].exitcode
                print(f"sgmft serve: worker {dead[0].name} (pid {dead[0].pid}) exited with status {crashed}; "
                      "stopping the others", file=sys.stderr, flush=True)
                forward(signal.SIGTERM, None)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sock.close()
    if crashed is not None:
        return crashed if crashed > 0 else 1
    # a worker killed by the very signal passed on (still starting, before any handler) stopped as asked
    asked = {-s for s in stopping}
    return 0 if all(p.exitcode == 0 or p.exitcode in asked for p in procs) else 1
