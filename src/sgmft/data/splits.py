"""Train/val/test splits for labelled posts (scikit-learn based, deterministic by seed).

Two modes:

* ``"stratified"`` (the paper): a stratified ``test_fraction`` test set, then a stratified
  validation set holding ``val_fraction`` *of the remaining train part*.
* ``"user"``: the same fractions, but user-disjoint (no user has posts in two splits), so a
  model cannot score by recognising a user's habits. Built from
  :class:`~sklearn.model_selection.StratifiedGroupKFold` folds, so class balance is kept as far
  as the user grouping allows and the fractions are met approximately (whole users move).

Rows whose label is negative (``-1`` = unlabelled) belong to no split: their entry is ``""``.
"""

from __future__ import annotations

from sgmft.errors import InputError, SgmftWarning, note  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import math
import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

__all__ = ["SPLIT_NAMES", "MODES", "make_split", "resolve_split"]

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
MODES: tuple[str, ...] = ("stratified", "user")

_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
            "validation": "val", "dev": "val", "test": "test", "": ""}
_MAX_FOLDS = 20


# --------------------------------------------------------------------------- validation
def _check_labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("labels must be integer class indices (-1 = unlabelled)")
        y = y.astype(np.int64)
    return y.astype(np.int64, copy=False)


def _check_fractions(test_fraction: float, val_fraction: float) -> None:
    if not 0.0 < float(test_fraction) < 1.0:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"unknown split mode {mode!r}; expected one of {MODES}")


def _is_missing(u) -> bool:
    if u is None:
        return True
    if isinstance(u, float | np.floating) and np.isnan(u):
        return True
    return isinstance(u, str | bytes) and len(u.strip()) == 0


def _group_ids(users, n: int, labelled: np.ndarray) -> np.ndarray:
    """Map user ids (any hashable type) to integer group ids; error on missing users."""
    if users is None:
        raise InputError("mode 'user' needs a user id per post (users=None given)")
    u = np.asarray(users, dtype=object)
    if u.shape != (n,):
        raise InputError(f"users must have one entry per label: {u.shape} vs ({n},)")
    missing = [i for i in np.flatnonzero(labelled) if _is_missing(u[i])]
    if missing:
        raise InputError(f"mode 'user': {len(missing)} labelled post(s) have no user id "
                         f"(first row {missing[0]})")
    keys = np.array([str(x) for x in u], dtype=object)
    _, inverse = np.unique(keys, return_inverse=True)
    return inverse.astype(np.int64)


# --------------------------------------------------------------------------- carving helpers
def _stratified_carve(idx: np.ndarray, y: np.ndarray, fraction: float, seed: int,
                      what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, carved) with ``fraction`` carved, stratified by ``y``. A class with one post in
    ``idx`` cannot be stratified: it stays in ``rest`` (a warning names it), so no post is lost."""
    classes, counts = np.unique(y[idx], return_counts=True)
    rare = classes[counts < 2]
    if len(rare):
        warnings.warn(f"class(es) {', '.join(str(int(c)) for c in rare)} have one post among those the "
                      f"{what} split is carved from: {'it stays' if len(rare) == 1 else 'they stay'} in training "
                      f"and the {what} split has none of {'it' if len(rare) == 1 else 'them'}", SgmftWarning,
                      stacklevel=4)
        keep = np.isin(y[idx], rare)
        if not (~keep).any():
            raise InputError(f"cannot carve the {what} split: each of the {len(idx)} posts is the only one of its "
                             "class; add data or merge classes")
        rest, carved = _stratified_carve(idx[~keep], y, fraction, seed, what)
        return np.sort(np.concatenate([rest, idx[keep]])), carved
    size: float | int = fraction
    if 0 < math.ceil(fraction * len(idx)) < len(classes) <= len(idx) - len(classes):
        size = len(classes)                  # stratifying needs one post of each class on each side
        note(f"the {what} split takes {size} posts, one per class, instead of {math.ceil(fraction * len(idx))} "
             f"({fraction:.0%} of {len(idx)})", stacklevel=3)
    try:
        rest, carved = train_test_split(idx, test_size=size, stratify=y[idx],
                                        random_state=seed, shuffle=True)
    except ValueError as exc:
        raise InputError(f"cannot stratify the {what} split ({len(idx)} posts, "
                         f"{len(classes)} classes, fraction {fraction}): {exc}") from exc
    return np.sort(rest), np.sort(carved)


def _fold_plan(fraction: float, n_groups: int) -> tuple[int, int]:
    """Pick (k folds, m of them) with m/k closest to ``fraction``; fewest folds on ties."""
    best = None
    for k in range(2, max(2, min(_MAX_FOLDS, n_groups)) + 1):
        m = int(np.clip(round(fraction * k), 1, k - 1))
        err = abs(m / k - fraction)
        if best is None or err < best[0] - 1e-12:
            best = (err, k, m)
    return best[1], best[2]


def _group_carve(idx: np.ndarray, y: np.ndarray, groups: np.ndarray, fraction: float,
                 seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into user-disjoint (rest, carved), carved ≈ ``fraction`` of posts."""
    n_groups = len(np.unique(groups[idx]))
    if n_groups < 2:
        raise InputError(f"cannot make a user-disjoint {what} split: only {n_groups} user(s) "
                         f"among {len(idx)} posts")
    k, m = _fold_plan(fraction, n_groups)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare classes are expected here; stratification is best effort in user mode.
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        folds = [test for _, test in cv.split(idx, y[idx], groups[idx])]
    carved = np.sort(idx[np.concatenate(folds[:m])])
    rest = np.setdiff1d(idx, carved)
    return rest, carved


# --------------------------------------------------------------------------- public API
def make_split(labels: np.ndarray, *, users: np.ndarray | None = None, mode: str = "stratified",
               test_fraction: float = 0.2, val_fraction: float = 0.1,
               seed: int = 0) -> np.ndarray:
    """Assign each post to ``'train'``, ``'val'`` or ``'test'`` (``''`` for unlabelled rows).

    ``test_fraction`` is a fraction of the labelled posts; ``val_fraction`` a fraction of what
    remains after the test set is removed (``0`` = no validation split). ``mode='user'`` needs
    ``users`` (one id per post) and keeps every user in a single split. The result is fully
    determined by the inputs and ``seed``. Raises ``ValueError`` on an unknown mode, missing
    users, bad fractions, or classes too small to stratify (stratified mode).
    """
    _check_mode(mode)
    _check_fractions(test_fraction, val_fraction)
    y = _check_labels(labels)
    n = len(y)
    labelled = y >= 0
    groups = _group_ids(users, n, labelled) if mode == "user" else None
    out = np.full(n, "", dtype="<U5")
    idx = np.flatnonzero(labelled)
    if len(idx) == 0:
        raise InputError("no labelled posts to split (all labels are negative)")

    if mode == "stratified":
        train, test = _stratified_carve(idx, y, test_fraction, seed, "test")
        if val_fraction > 0:
            train, val = _stratified_carve(train, y, val_fraction, seed, "val")
        else:
            val = np.empty(0, dtype=np.int64)
    else:
        train, test = _group_carve(idx, y, groups, test_fraction, seed, "test")
        if val_fraction > 0:
            train, val = _group_carve(train, y, groups, val_fraction, seed, "val")
        else:
            val = np.empty(0, dtype=np.int64)

    out[train] = "train"
    out[val] = "val"
    out[test] = "test"
    return out


def _normalise_store_split(store_split, n: int) -> np.ndarray:
    s = np.asarray(store_split, dtype=object)
    if s.shape != (n,):
        raise InputError(f"stored split must have one entry per label: {s.shape} vs ({n},)")
    out = np.full(n, "", dtype="<U5")
    unknown = set()
    for i, v in enumerate(s):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        if isinstance(v, bytes | np.bytes_):
            v = v.decode("utf-8")
        key = str(v).strip().lower()
        if key not in _ALIASES:
            unknown.add(str(v))
            continue
        out[i] = _ALIASES[key]
    if unknown:
        raise InputError(f"stored split has unknown value(s) {sorted(unknown)[:5]}; "
                         f"expected {SPLIT_NAMES} or ''")
    return out


def resolve_split(store_split: np.ndarray | None, labels, users, mode: str = "stratified",
                  test_fraction: float = 0.2, val_fraction: float = 0.1,
                  seed: int = 0) -> np.ndarray:
    """Use the split stored with the data when there is one, else :func:`make_split`.

    A stored split needs ``train`` and ``test`` rows; when it has no ``val`` rows (and
    ``val_fraction > 0``) a validation set is carved out of ``train`` (stratified, or
    user-disjoint within train in ``mode='user'``). Unlabelled rows are always ``''``.
    Aliases ``valid``/``validation``/``dev`` are read as ``val``.
    """
    _check_mode(mode)
    _check_fractions(test_fraction, val_fraction)
    y = _check_labels(labels)
    n = len(y)
    if store_split is None:
        return make_split(y, users=users, mode=mode, test_fraction=test_fraction,
                          val_fraction=val_fraction, seed=seed)
    split = _normalise_store_split(store_split, n)
    split[y < 0] = ""
    if not np.any(split != ""):
        return make_split(y, users=users, mode=mode, test_fraction=test_fraction,
                          val_fraction=val_fraction, seed=seed)
    present = set(np.unique(split)) - {""}
    missing = {"train", "test"} - present
    if missing:
        raise InputError(f"stored split has no {sorted(missing)} rows; it needs train and test "
                         f"(drop it to have one made)")
    if "val" not in present and val_fraction > 0:
        train = np.flatnonzero(split == "train")
        if mode == "user":
            groups = _group_ids(users, n, split == "train")
            _, val = _group_carve(train, y, groups, val_fraction, seed, "val")
        else:
            _, val = _stratified_carve(train, y, val_fraction, seed, "val")
        split[val] = "val"
    return split
