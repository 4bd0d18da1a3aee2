"""``sgmft serve``: an HTTP service (FastAPI + uvicorn) and a web page for a trained run.

* :func:`create_app` / :func:`load_app` (:mod:`sgmft.serve.app`): the ASGI app around a
  :class:`~sgmft.predict.PostPredictor` (the object ``sgmft predict`` uses);
* :class:`ServeConfig` (:mod:`sgmft.serve.config`): limits and batching settings;
* :func:`serve` (:mod:`sgmft.serve.server`): run it under uvicorn, draining on SIGTERM;
* the ``sgmft serve`` verb is in :mod:`sgmft.cli.serve`.

Nothing here imports Lightning or the training code. The names are imported lazily so the
command line does not pay for FastAPI unless it serves. See docs/serve.md.
"""

from __future__ import annotations

__all__ = ["ServeConfig", "create_app", "load_app", "serve"]

_WHERE = {"ServeConfig": "sgmft.serve.config", "create_app": "sgmft.serve.app", "load_app": "sgmft.serve.app",
          "serve": "sgmft.serve.server"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'sgmft.serve' has no attribute {name!r}")
