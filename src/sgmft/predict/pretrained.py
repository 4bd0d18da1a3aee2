"""Hugging Face-style sharing of a trained model: ``save_pretrained`` / ``from_pretrained`` and
the model card.

A shared model is the checkpoint folder of :mod:`sgmft.checkpoint` (``config.json``,
``labels.json``, ``features.json``, ``model.safetensors``) plus ``README.md``, the model card
of :mod:`sgmft.card`. Such a folder can be uploaded as it is
(``hf upload OWNER/NAME FOLDER``) and loaded back by folder or by hub id:

* a local folder (a run, its ``model/`` folder, or a saved folder) is read directly;
* a hub id (``owner/name``) is resolved with ``huggingface_hub.snapshot_download`` (only
  the model files; the local cache first). Nothing is downloaded when ``HF_HUB_OFFLINE=1``
  or without network: the error then says how to download the folder.

Imports neither Lightning nor the training code.
"""

from __future__ import annotations

import re
from pathlib import Path

from sgmft.card import CARD
from sgmft.checkpoint import FILES
from sgmft.errors import BackboneUnavailableError

__all__ = ["ModelUnavailableError", "resolve_pretrained"]

SHARED_FILES = (*FILES, CARD)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelUnavailableError(BackboneUnavailableError):
    """A hub model that is not in the local cache and cannot be downloaded here."""


def resolve_pretrained(name_or_path, *, revision: str | None = None, cache_dir=None) -> Path:
    """A local folder, or a hub id resolved to its snapshot folder in the Hugging Face cache."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    name = str(name_or_path)
    if not _HUB_ID.match(name):
        raise FileNotFoundError(f"model not found: {name} is neither a folder nor a Hugging Face hub id "
                                "(owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:                                  # pragma: no cover - installed with transformers
        raise ModelUnavailableError(f"{name}: loading a hub id needs huggingface_hub "
                                    "(pip install huggingface_hub), or pass a local folder") from None
    how = (f"download it where there is network, e.g. `hf download {name} --local-dir models/{name.split('/')[-1]}`"
           f"{' --revision ' + revision if revision else ''}, copy the folder here and pass its path")
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=cache_dir,
                                   allow_patterns=list(SHARED_FILES))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ModelUnavailableError(f"model {name!r} is not in the local Hugging Face cache and cannot be "
                                    f"downloaded here (offline: HF_HUB_OFFLINE=1 or no network): {how} "
                                    f"({type(e).__name__})") from None
    except Exception as e:                               # repository not found, gated, HTTP errors
        raise ModelUnavailableError(f"model {name!r} could not be fetched from the Hugging Face hub "
                                    f"({type(e).__name__}: {e}); {how}") from None
    return Path(folder)
