"""The one prediction file format, written by ``sgmft evaluate``, ``sgmft predict`` (feature
stores and raw-post manifests) and their Python counterparts.

One row per post, columns in this order::

    id, pred, prob_<place>..., true, <extras>..., uncertain, explanation_decided_by, explanation_text,
    explanation_image

* ``id``    the post id;
* ``pred``  the predicted place (the most probable one);
* ``prob_<place>`` one column per place, in the model's label order, each row summing to 1;
* ``true``  the true place, only when it is known: the column is absent when no post has
  one, and empty (CSV) / absent (JSONL) for a post without one;
* extras    writer-specific columns after the schema ones (``sgmft predict --manifest``
  adds ``text_mask`` and ``image_mask``, written 1/0 in CSV, true/false in JSONL);
* ``uncertain`` (1/0 in CSV, true/false in JSONL): the top probability is below the
  ``--min-confidence`` given (never true without one); written by ``predict`` and ``evaluate``;
* the account of which modality decided (:mod:`sgmft.predict.explain`): in CSV three flat
  columns ``explanation_decided_by`` (text, image, both, neither), ``explanation_text`` and
  ``explanation_image`` (each modality's state); in JSONL one nested object ``explanation``
  with those and ``sentence``, ``method`` and ``scores``. Written by ``predict`` and ``evaluate``.

New columns only ever go after the old ones, so a reader of the old layout keeps working.

Two encodings of the same rows: CSV (the file name ends in ``.csv``) and JSON Lines
(anything else), one flat object per line with the CSV's column names as keys. The old
layouts (``label`` meaning the truth in evaluate's CSV and the prediction in predict's) are
gone. Files are written atomically (:mod:`sgmft.atomic`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Sequence

import numpy as np

from sgmft.atomic import atomic_file

__all__ = ["EXPLANATION_COLUMNS", "PredictionBatch", "PredictionWriter", "prediction_columns", "prediction_format",
           "read_predictions", "write_prediction_batches", "write_predictions"]

#: the flat CSV columns of the explanation (the JSONL object has these keys without the prefix, and more)
EXPLANATION_COLUMNS = ("explanation_decided_by", "explanation_text", "explanation_image")


def prediction_format(path) -> str:
    """``"csv"`` for a ``.csv`` file name, else ``"jsonl"``."""
    return "csv" if Path(path).suffix.lower() == ".csv" else "jsonl"


def prediction_columns(label_names: Sequence[str], *, with_true: bool, extras: Sequence[str] = (),
                       with_uncertain: bool = False, with_explanation: bool = False) -> list[str]:
    """The CSV header (JSONL: the keys, with one ``explanation`` object for the three columns)."""
    return ["id", "pred", *[f"prob_{n}" for n in label_names], *(["true"] if with_true else []), *extras,
            *(["uncertain"] if with_uncertain else []), *(EXPLANATION_COLUMNS if with_explanation else ())]


def _plain(v):
    """A numpy scalar / bytes id as a plain str or number."""
    v = v.item() if isinstance(v, np.generic) else v
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _true_name(t, names: Sequence[str]) -> str | None:
    """A truth value (a place name, or an index with -1 = unlabelled) as a name, None if unknown."""
    t = _plain(t)
    if t is None or t == "":
        return None
    if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
        return None if t < 0 else str(names[int(t)])
    return str(t)


class PredictionWriter:
    """Writes prediction rows to an open text file ``f`` in ``fmt`` (``"csv"`` or ``"jsonl"``).

    ``with_true``: whether the file has a ``true`` column; ``extras``: names of extra columns;
    ``with_uncertain`` / ``with_explanation``: the ``uncertain`` column and the explanation
    (then :meth:`write` needs ``uncertain=`` / ``explanations=``).
    The CSV header is written at construction; call :meth:`write` once per batch.
    """

    def __init__(self, f: IO[str], fmt: str, label_names: Sequence[str], *, with_true: bool,
                 extras: Sequence[str] = (), with_uncertain: bool = False, with_explanation: bool = False):
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"prediction format must be 'csv' or 'jsonl', got {fmt!r}")
        self.f, self.fmt = f, fmt
        self.names = [str(n) for n in label_names]
        self.with_true, self.extras = with_true, list(extras)
        self.with_uncertain, self.with_explanation = with_uncertain, with_explanation
        self.columns = prediction_columns(self.names, with_true=with_true, extras=self.extras,
                                          with_uncertain=with_uncertain, with_explanation=with_explanation)
        self.rows = 0
        self._csv = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(self.columns)

    def write(self, ids: Iterable, probs, true: Iterable | None = None,
              extras: dict[str, Sequence] | None = None, pred=None, *, uncertain=None,
              explanations: Sequence[dict] | None = None) -> None:
        """One batch: ``probs`` (n, K); ``true``: label names or indices (None / "" / -1 =
        unknown); ``extras``: column name -> n values; ``pred``: predicted indices when
        they are not ``probs.argmax(1)`` (default); ``uncertain``: n bools;
        ``explanations``: n accounts (:mod:`sgmft.predict.explain`)."""
        probs = np.asarray(probs, dtype=np.float64)
        ids = list(ids)
        n = len(ids)
        if probs.shape != (n, len(self.names)):
            raise ValueError(f"probs must be ({n}, {len(self.names)}), got {probs.shape}")
        true = list(true) if true is not None else None
        if true is not None and not self.with_true:
            raise ValueError("this prediction file has no 'true' column")
        if true is not None and len(true) != n:
            raise ValueError(f"true has {len(true)} entries for {n} posts")
        extras = extras or {}
        if sorted(extras) != sorted(self.extras):
            raise ValueError(f"extra columns {sorted(extras)} differ from {sorted(self.extras)}")
        unc = self._checked("uncertain", uncertain, self.with_uncertain, n)
        expl = self._checked("explanations", explanations, self.with_explanation, n)
        top = (probs.argmax(1) if n else np.zeros(0, np.int64)) if pred is None else np.asarray(pred, np.int64)
        if len(top) != n:
            raise ValueError(f"pred has {len(top)} entries for {n} posts")
        for i in range(n):
            t = _true_name(true[i], self.names) if true is not None else None
            if self._csv is not None:
                row = [_plain(ids[i]), self.names[top[i]], *[repr(float(p)) for p in probs[i]]]
                if self.with_true:
                    row.append(t or "")
                row += [int(v) if isinstance(_plain(v), bool) else _plain(v)
                        for v in (extras[c][i] for c in self.extras)]
                if unc is not None:
                    row.append(int(bool(unc[i])))
                if expl is not None:
                    row += [expl[i]["decided_by"], expl[i]["text"], expl[i]["image"]]
                self._csv.writerow(row)
            else:
                rec = {"id": _plain(ids[i]), "pred": self.names[top[i]]}
                rec.update({f"prob_{nm}": float(p) for nm, p in zip(self.names, probs[i])})
                if t is not None:
                    rec["true"] = t
                rec.update({c: _plain(extras[c][i]) for c in self.extras})
                if unc is not None:
                    rec["uncertain"] = bool(unc[i])
                if expl is not None:
                    rec["explanation"] = expl[i]
                self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.rows += n

    @staticmethod
    def _checked(name: str, values, wanted: bool, n: int):
        if values is None:
            if wanted:
                raise ValueError(f"this prediction file has a column for {name}: pass {name}=")
            return None
        if not wanted:
            raise ValueError(f"this prediction file has no column for {name}")
        values = list(values)
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} posts")
        return values


def write_predictions(path, ids, probs, label_names: Sequence[str], true=None, *,
                      extras: dict[str, Sequence] | None = None, fmt: str | None = None,
                      pred=None, uncertain=None, explanations: Sequence[dict] | None = None) -> Path:
    """Write a whole prediction file atomically (CSV or JSONL by ``path``'s suffix unless
    ``fmt``); the ``true`` column appears when ``true`` is given and names at least one
    known place; ``uncertain`` and the explanation columns when they are given."""
    path = Path(path)
    fmt = fmt or prediction_format(path)
    if true is not None:
        true = list(true)
        if all(_true_name(t, label_names) is None for t in true):
            true = None                    # no known truth at all: no 'true' column
    with atomic_file(path, "w", encoding="utf-8", newline="") as f:
        w = PredictionWriter(f, fmt, label_names, with_true=true is not None, extras=list(extras or {}),
                             with_uncertain=uncertain is not None, with_explanation=explanations is not None)
        w.write(ids, probs, true, extras, pred, uncertain=uncertain, explanations=explanations)
    return path


@dataclass
class PredictionBatch:
    """One batch of rows for :func:`write_prediction_batches`: ids, probabilities (n, K), the
    true place names (None per unknown one; None for the whole batch when unlabelled), the
    extra columns, the ``uncertain`` flags and the explanations."""

    ids: Sequence
    probs: np.ndarray
    uncertain: Sequence[bool]
    explanations: Sequence[dict]
    true: Sequence[str | None] | None = None
    extras: dict[str, Sequence] = field(default_factory=dict)


@dataclass
class BatchTally:
    """What :func:`write_prediction_batches` counts while it writes; :meth:`summary` reports it."""

    label_names: Sequence[str]
    out: Path
    min_confidence: float | None = None
    t0: float = field(default_factory=time.perf_counter)
    rows: int = 0
    labelled: int = 0
    correct: int = 0
    uncertain: int = 0
    predicted: Counter = field(default_factory=Counter)

    def add(self, b: PredictionBatch, with_true: bool = True) -> None:
        """Count a written batch (its truth only when the file has a ``true`` column)."""
        top = np.asarray(b.probs).argmax(1) if len(b.ids) else np.zeros(0, np.int64)
        self.rows += len(b.ids)
        self.predicted.update(self.label_names[i] for i in top)
        self.uncertain += int(np.sum(np.asarray(b.uncertain, dtype=bool)))
        for t, i in zip(b.true if with_true and b.true is not None else (), top):
            if t is not None:
                self.labelled += 1
                self.correct += t == self.label_names[i]

    def summary(self, **head) -> dict:
        """``posts, out, <head>..., predicted, labelled, seconds`` (+ ``min_confidence``,
        ``uncertain`` when a threshold was given, ``accuracy`` when some rows are labelled)."""
        s = {"posts": self.rows, "out": str(self.out), **head,
             "predicted": {n: self.predicted[n] for n in self.label_names if self.predicted[n]},
             "labelled": self.labelled, "seconds": round(time.perf_counter() - self.t0, 2)}
        if self.min_confidence is not None:
            s.update(min_confidence=float(self.min_confidence), uncertain=self.uncertain)
        if self.labelled:
            s["accuracy"] = self.correct / self.labelled
        return s


def write_prediction_batches(out_path, label_names: Sequence[str], batches: Iterable[PredictionBatch], *,
                             total: int | None, with_true: bool | None, extras: Sequence[str] = (),
                             progress: bool = False, min_confidence: float | None = None,
                             t0: float | None = None) -> BatchTally:
    """The one batch prediction writer (``predict --store`` and ``predict --manifest``, local or
    on Ray): write ``batches`` to ``out_path`` atomically (CSV or JSONL by its suffix, with the
    ``uncertain`` column and the explanation), with a progress bar of ``total`` posts (None:
    unknown), counting as it goes. Returns the :class:`BatchTally` (its ``summary()`` is the
    command's summary; its ``seconds`` count from ``t0``, a ``time.perf_counter()`` value,
    default now).

    ``with_true=None`` (a streamed manifest, whose labels are not known before the end): the
    file has a ``true`` column when some row has a known truth. JSONL rows do not depend on it;
    a CSV body is written to a temporary file beside ``out_path`` with the column and copied
    into place at the end, without the column when no row had a truth. Memory stays one batch."""
    from tqdm.auto import tqdm

    out_path = Path(out_path)
    fmt = prediction_format(out_path)
    tally = BatchTally(list(label_names), out_path, min_confidence)
    if t0 is not None:
        tally.t0 = t0
    decide_later = with_true is None and fmt == "csv"
    bar = tqdm(total=total, unit="post", desc="predict", disable=not progress, dynamic_ncols=True)
    try:
        with atomic_file(out_path, "w", encoding="utf-8", newline="") as f:
            body = (tempfile.TemporaryFile("w+", encoding="utf-8", newline="", dir=out_path.parent,
                                           prefix=f".{out_path.name}.", suffix=".body") if decide_later
                    else contextlib.nullcontext(f))
            with body as g:
                writer = PredictionWriter(g, fmt, label_names, with_true=with_true is not False,
                                          extras=extras, with_uncertain=True, with_explanation=True)
                for b in batches:
                    writer.write(b.ids, b.probs, b.true if with_true is not False else None,
                                 b.extras if extras else None, uncertain=b.uncertain, explanations=b.explanations)
                    tally.add(b, with_true is not False)
                    bar.update(len(b.ids))
                if decide_later:
                    g.seek(0)
                    _copy_csv(g, f, drop=None if tally.labelled else writer.columns.index("true"))
    finally:
        bar.close()
    return tally


def _copy_csv(src: IO[str], dst: IO[str], drop: int | None) -> None:
    """Copy CSV text from ``src`` to ``dst``, without column ``drop`` (an index) unless None; the
    rows are written as :class:`PredictionWriter` writes them (same dialect), so the result is
    the file it would have written without that column."""
    if drop is None:
        shutil.copyfileobj(src, dst, 1 << 20)
        return
    w = csv.writer(dst, lineterminator="\n")
    for row in csv.reader(src):
        del row[drop]
        w.writerow(row)


def read_predictions(path, fmt: str | None = None) -> list[dict]:
    """The rows of a prediction file as dicts (CSV values are strings, as written)."""
    path = Path(path)
    fmt = fmt or prediction_format(path)
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "csv":
            return list(csv.DictReader(f))
        return [json.loads(line) for line in f if line.strip()]
