"""``sgmft serve RUN``: the HTTP service of :mod:`sgmft.serve` (registered in :data:`sgmft.cli.VERBS`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from sgmft.serve.config import ServeConfig


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def serve_config_from_args(args) -> ServeConfig:
    """The ServeConfig of the flags, through the one config builder (sgmft.config.build_config): a bad
    value is the common ConfigError, naming the flag (``--max-queue=0 is not allowed; expected a value > 0``)."""
    from sgmft.config import build_config

    cfg = build_config(ServeConfig, {f.name: getattr(args, f.name) for f in ServeConfig.fields()},
                       "serve options", label=_flag)
    if not cfg.allowed_hosts:   # default: the bind address and localhost
        cfg = dataclasses.replace(cfg, allowed_hosts=",".join(cfg.hosts(args.host)))
    return cfg


def _load_app(args, cfg: ServeConfig, *, speak: bool = True):
    """Load the run and build the app (in the one process, or in each ``--workers`` process)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from sgmft.features.backbones.allocator import serving_default
    from sgmft.features.backbones.hf_clip import hf_progress_bars
    from sgmft.predict import PostPredictor
    from sgmft.serve.app import create_app

    serving_default()   # large uploaded images decode faster with glibc's defaults (allocator docstring)

    with hf_progress_bars(False):
        pp = PostPredictor.load(args.run_dir, backbone=args.backbone, device=args.device,
                                batch_size=cfg.max_batch_size, check_backbone=not args.ignore_backbone_mismatch)
    if speak:
        from sgmft.errors import note

        for text in pp.notes:          # the one warning channel: `sgmft serve: note: ...`
            note(text)
    return pp, create_app(pp, cfg)


def _banner(args, cfg: ServeConfig, pp=None) -> None:
    what = f" ({pp.backbone.spec}, D={pp.backbone.dim})" if pp is not None else ""
    workers = (f"; {args.workers} worker processes, {args.threads} torch thread(s) each"
               if args.workers > 1 else "")
    print(f"sgmft serve: {args.run_dir}{what} on http://{args.host}:{args.port}/ "
          f"(API docs at /docs; Host headers accepted: {cfg.allowed_hosts}{workers})", file=sys.stderr, flush=True)
    if args.host in ("0.0.0.0", "::") and not args.allowed_hosts:
        from sgmft.errors import note

        note("listening on every interface, but only localhost Host headers are accepted; give the "
             "names clients use with --allowed-hosts")


def serve_worker(k: int, sock, args) -> int:
    """One ``--workers`` process: load the run, serve the shared socket until a signal."""
    from sgmft.serve.server import make_server

    cfg = serve_config_from_args(args)
    _, app = _load_app(args, cfg, speak=k == 0)
    make_server(app, args.host, args.port, log_level=args.log_level, access_log=args.access_log).run(sockets=[sock])
    return 0


def cmd_serve(args) -> int:
    if not Path(args.run_dir).exists():
        raise FileNotFoundError(f"run directory not found: {args.run_dir}")
    if args.workers < 1:
        from sgmft.errors import ConfigError

        raise ConfigError(f"serve options: --workers={args.workers} is not allowed; expected a value >= 1")
    cfg = serve_config_from_args(args)
    if args.workers > 1:
        from sgmft.serve.workers import run_workers, usable_cores

        if not args.threads:   # the cores shared out, so that N workers do not fight over them
            args.threads = max(1, usable_cores() // args.workers)
        _banner(args, cfg)
        return run_workers(args.workers, args.host, args.port, serve_worker, args)
    from sgmft.serve.server import serve

    pp, app = _load_app(args, cfg)
    _banner(args, cfg, pp)
    serve(app, args.host, args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


HELP = "serve a trained run over HTTP (JSON API + a web page at /)"
DESCRIPTION = ("An HTTP service around the same predictor as `sgmft predict`: POST /v1/predict (multipart "
               "or base64 JSON), /v1/predict/batch, /v1/predict/features, GET /v1/model, /v1/health, "
               "/v1/ready, /metrics (Prometheus), API docs at /docs and a page at /. Concurrent requests "
               "are batched; images are decoded off the inference thread. SIGTERM drains: /v1/ready turns 503 for "
               "--drain-seconds, then in-flight requests finish and new ones get 503. See docs/serve.md.")


def serve_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("run_dir", help="training run directory (or its model/ directory)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--backbone", help="backbone spec (default: the one recorded in the checkpoint)")
    s.add_argument("--ignore-backbone-mismatch", dest="ignore_backbone_mismatch", action="store_true",
                   help="allow a backbone whose fingerprint differs from the training one (a note instead)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; with --workers N, "
                   "the usable cores / N per worker)")
    s.add_argument("--workers", type=int, default=1,
                   help="server processes on the one port (default 1). One process uses about one core; on a "
                        "machine with more, N workers serve up to N times the small requests (docs/serve.md)")
    s.add_argument("--log-level", dest="log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"], help="server log level")
    s.add_argument("--access-log", dest="access_log", action="store_true", help="log every request")
    g = s.add_argument_group("limits, exposure, batching, shutdown (docs/serve.md)")
    for f in ServeConfig.fields():
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            g.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
        else:
            g.add_argument(flag, dest=f.name, type=type(f.default), default=f.default, help=f.metadata["help"])
