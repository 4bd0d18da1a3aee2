"""``ExtractOptions``: every option of ``sgmft extract`` in one typed, checked object (issue 19).

:func:`sgmft.features.extract.extract_features` takes one (``options=``), or the same
fields as keyword arguments (the older call form, still supported), or both (keywords
override the object's fields). The engine is one of them: ``engine="local"`` (this
process; ``num_processes`` spawns more, ``torchrun`` joins them) or ``engine="ray"`` (Ray
Data: :mod:`sgmft.features.ray_engine`; ``address``, ``num_cpus``, ``actors`` and
``object_store_mb`` are its options). The CLI maps its flags onto this object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgmft.errors import InputError
from sgmft.features.encode import DEFAULT_MAX_IMAGES, check_image_choice
from sgmft.ingest.images import DEFAULT_MAX_PIXELS
from sgmft.ingest.text import CleanConfig
from sgmft.labels import DEFAULT_LABELS

__all__ = ["ENGINES", "DEFAULT_OBJECT_STORE_MB", "DEFAULT_PREFETCH_BYTES", "ExtractOptions", "resolve_options"]

ENGINES = ("local", "ray")
# Prepared batches waiting for the model forward, all together (bytes of their tensors).
DEFAULT_PREFETCH_BYTES = 512 * 2**20
# object store of a Ray instance started here (not of a cluster joined with --address): bounded, so
# prepared batches waiting for a replica cannot take the machine's memory (Ray Data backpressures)
DEFAULT_OBJECT_STORE_MB = 1024
_RAY_ONLY = ("address", "num_cpus", "actors")


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract (what to extract is the manifest, the store and the backbone).

    ``image_choice``: ``"similar"`` (the image closest to the text, cosine; the paper's
    manual choice, automated), ``"first"`` (first usable image; later ones are not even
    loaded) or ``"mean"`` (L2-normalised mean of the usable images).
    ``cache_dir``: default ``<out_store>.cache``; deleted at the end unless ``keep_cache``.
    ``on_error``: ``"skip"`` (bad rows and images become rejects, written to
    ``rejects_path`` as JSONL) or ``"raise"`` (stop at the first problem).
    ``progress``: ``None`` = bars only on a terminal. ``threads``: torch CPU threads per
    process (default: unchanged; spawned workers get ``cpu_count // num_processes``; float
    results compare bit for bit only at equal ``threads``). ``max_images``: images used per
    post (the rest are rejected with a reason; ``None`` = all).
    ``prefetch_bytes``: prepared batches waiting for the forward hold at most this much.
    ``image_root`` / ``allow_any_path``: where image paths may point. ``field_limits``:
    ``max_id_chars`` / ``max_user_chars`` / ``max_text_chars`` of the manifest reader.
    ``engine``: ``"local"`` or ``"ray"``; ``num_processes`` is local only, ``address``,
    ``num_cpus``, ``actors``, ``object_store_mb`` are Ray only (docs/scale.md).
    """

    clean_cfg: CleanConfig | None = None
    image_choice: str = "similar"
    batch_size: int = 32
    cache_dir: Path | None = None
    rejects_path: Path | None = None
    on_error: str = "skip"
    progress: bool | None = None
    label_names: tuple[str, ...] = tuple(DEFAULT_LABELS)
    device: str = "auto"
    dtype: str = "auto"
    num_workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    keep_cache: bool = True
    threads: int | None = None
    max_images: int | None = DEFAULT_MAX_IMAGES
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES
    image_root: Path | None = None
    allow_any_path: bool = False
    field_limits: dict | None = None
    engine: str = "local"
    num_processes: int = 1
    address: str | None = None
    num_cpus: int | None = None
    actors: int | None = None
    object_store_mb: int | None = DEFAULT_OBJECT_STORE_MB

    def __post_init__(self) -> None:
        fix = object.__setattr__
        for name in ("cache_dir", "rejects_path", "image_root"):
            if getattr(self, name) is not None:
                fix(self, name, Path(getattr(self, name)))
        fix(self, "label_names", tuple(str(n) for n in self.label_names))
        check_image_choice(self.image_choice)
        if self.on_error not in ("skip", "raise"):
            raise InputError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.engine not in ENGINES:
            raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        for name in ("batch_size", "num_processes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.engine == "ray" and self.num_processes > 1:
            raise InputError("--num-processes is for --engine local; with --engine ray, Ray places the replicas")
        given = [k for k in _RAY_ONLY if getattr(self, k) is not None]
        if self.engine != "ray" and given:
            raise InputError(f"{', '.join(given)} need engine='ray' (--engine ray)")

    @classmethod
    def of(cls, options: "ExtractOptions | None" = None, **changes: Any) -> "ExtractOptions":
        """``options`` (default: all defaults) with ``changes`` (field names; ``None`` values
        of ``engine`` are ignored), checked. An unknown name is a :class:`TypeError`."""
        base = options if options is not None else cls()
        if not isinstance(base, cls):
            raise TypeError(f"options must be an ExtractOptions, got {type(base).__name__}")
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"extract_features() got unexpected keyword argument(s) {unknown}; "
                            f"the options are the fields of ExtractOptions")
        if changes.get("engine", "") is None:
            changes.pop("engine")
        return dataclasses.replace(base, **changes) if changes else base

    def replace(self, **changes: Any) -> "ExtractOptions":
        return dataclasses.replace(self, **changes)

    def reader_options(self) -> dict:
        """The manifest checks of extraction (keyword arguments of
        :func:`~sgmft.ingest.manifest.read_manifest` / ``iter_manifest``)."""
        return dict(label_names=self.label_names, check_images=True, on_error=self.on_error,
                    image_root=self.image_root, allow_any_path=self.allow_any_path, **(self.field_limits or {}))


def resolve_options(manifest, out_store, options: ExtractOptions | None = None, **changes: Any) -> ExtractOptions:
    """What every engine runs with: ``options`` with ``changes`` (:meth:`ExtractOptions.of`),
    ``progress`` decided (``None``: bars only on a terminal, as the CLI) and ``cache_dir``
    defaulted to ``<out_store>.cache``; output paths naming the manifest are refused here,
    before anything is written."""
    from sgmft.atomic import check_outputs
    from sgmft.config import progress_enabled

    o = ExtractOptions.of(options, **changes)
    out_store = Path(out_store)
    o = o.replace(progress=progress_enabled(o.progress),
                  cache_dir=o.cache_dir or out_store.with_name(out_store.name + ".cache"))
    check_outputs({"the manifest": manifest},
                  {"the store (--out)": out_store, "the cache (--cache-dir)": o.cache_dir,
                   "the rejects file (--rejects)": o.rejects_path})
    return o
