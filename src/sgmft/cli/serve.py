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


def cmd_serve(args) -> int:
    if not Path(args.run_dir).exists():
        raise FileNotFoundError(f"run directory not found: {args.run_dir}")
    cfg = serve_config_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from sgmft.features.backbones.hf_clip import hf_progress_bars
    from sgmft.predict import PostPredictor
    from sgmft.serve.app import create_app
    from sgmft.serve.server import serve

    with hf_progress_bars(False):
        pp = PostPredictor.load(args.run_dir, backbone=args.backbone, device=args.device,
                                batch_size=cfg.max_batch_size, check_backbone=not args.ignore_backbone_mismatch)
    from sgmft.errors import note

    for text in pp.notes:          # the one warning channel: `sgmft serve: note: ...`
        note(text)
    app = create_app(pp, cfg)
    print(f"sgmft serve: {args.run_dir} ({pp.backbone.spec}, D={pp.backbone.dim}) on http://{args.host}:{args.port}/ "
          f"(API docs at /docs; Host headers accepted: {cfg.allowed_hosts})", file=sys.stderr, flush=True)
    if args.host in ("0.0.0.0", "::") and not args.allowed_hosts:
        note("listening on every interface, but only localhost Host headers are accepted; give the "
             "names clients use with --allowed-hosts")
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
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
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
