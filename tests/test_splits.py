"""Tests for sgmft.data.splits: fractions, stratification, user-disjointness, determinism."""

import numpy as np
import pytest

from sgmft.data.splits import make_split, resolve_split


def _labels(n=2000, k=8, seed=0, unlabelled=0.0):
    rng = np.random.default_rng(seed)
    # Unbalanced classes, so stratification is actually tested.
    p = np.linspace(1.0, 3.0, k)
    y = rng.choice(k, size=n, p=p / p.sum()).astype(np.int64)
    if unlabelled:
        y[rng.random(n) < unlabelled] = -1
    return y


def _users(y, n_users=200, seed=0):
    rng = np.random.default_rng(seed)
    # Heavy-tailed post counts per user, string ids.
    w = rng.pareto(1.5, n_users) + 1
    return np.array([f"u{u}" for u in rng.choice(n_users, size=len(y), p=w / w.sum())])


def _fractions(split):
    lab = split[split != ""]
    return {s: float(np.mean(lab == s)) for s in ("train", "val", "test")}


def test_stratified_fractions_and_values():
    y = _labels()
    s = make_split(y, test_fraction=0.2, val_fraction=0.1, seed=0)
    assert s.shape == y.shape
    assert set(np.unique(s)) == {"train", "val", "test"}
    f = _fractions(s)
    assert f["test"] == pytest.approx(0.2, abs=0.01)
    assert f["val"] == pytest.approx(0.8 * 0.1, abs=0.01)
    assert f["train"] == pytest.approx(0.72, abs=0.01)


def test_stratified_per_class_proportions():
    y = _labels(n=3000)
    s = make_split(y, seed=3)
    overall = np.bincount(y, minlength=8) / len(y)
    for part in ("train", "val", "test"):
        prop = np.bincount(y[s == part], minlength=8) / np.sum(s == part)
        assert np.abs(prop - overall).max() < 0.01, part


def test_unlabelled_rows_get_empty_string():
    y = _labels(unlabelled=0.3)
    s = make_split(y, seed=0)
    assert np.all(s[y < 0] == "")
    assert np.all(s[y >= 0] != "")
    assert _fractions(s)["test"] == pytest.approx(0.2, abs=0.01)


def test_val_fraction_zero_gives_no_val():
    y = _labels()
    s = make_split(y, val_fraction=0.0)
    assert set(np.unique(s)) == {"train", "test"}


@pytest.mark.parametrize("mode", ["stratified", "user"])
def test_deterministic_by_seed(mode):
    y = _labels()
    u = _users(y)
    a = make_split(y, users=u, mode=mode, seed=7)
    b = make_split(y, users=u, mode=mode, seed=7)
    c = make_split(y, users=u, mode=mode, seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)


def test_user_mode_disjoint_and_close_to_fractions():
    y = _labels(n=4000, unlabelled=0.1)
    u = _users(y, n_users=400)
    s = make_split(y, users=u, mode="user", test_fraction=0.2, val_fraction=0.1, seed=0)
    assert np.all(s[y < 0] == "")
    owners = {}
    for user, part in zip(u[y >= 0], s[y >= 0], strict=True):
        owners.setdefault(user, set()).add(part)
    assert all(len(parts) == 1 for parts in owners.values())
    f = _fractions(s)
    assert f["test"] == pytest.approx(0.2, abs=0.06)
    assert f["val"] == pytest.approx(0.08, abs=0.04)
    # Best-effort stratification: every class in every split.
    for part in ("train", "val", "test"):
        assert set(np.unique(y[s == part])) == set(range(8))


def test_user_mode_accepts_integer_user_ids():
    y = _labels(n=500)
    u = np.arange(500) // 5
    s = make_split(y, users=u, mode="user", seed=1)
    for user in np.unique(u):
        assert len(set(s[u == user])) == 1


def test_errors():
    y = _labels()
    with pytest.raises(ValueError, match="users"):
        make_split(y, mode="user")
    with pytest.raises(ValueError, match="unknown split mode"):
        make_split(y, mode="random")
    with pytest.raises(ValueError, match="test_fraction"):
        make_split(y, test_fraction=1.2)
    with pytest.raises(ValueError, match="val_fraction"):
        make_split(y, val_fraction=-0.1)
    with pytest.raises(ValueError, match="cannot carve the test split: each of the 3 posts is the only one"):
        make_split(np.array([0, 1, 2]), test_fraction=0.3)
    with pytest.raises(ValueError, match="cannot stratify the test split"):   # nothing left to train on
        make_split(np.array([0, 0, 0, 1, 1]), test_fraction=0.9)
    with pytest.raises(ValueError, match="no labelled posts"):
        make_split(np.full(10, -1))
    u = _users(y).astype(object)
    u[5] = None
    with pytest.raises(ValueError, match="no user id"):
        make_split(y, users=u, mode="user")
    with pytest.raises(ValueError, match="only 1 user"):
        make_split(y, users=np.full(len(y), "same"), mode="user")


def test_resolve_split_uses_store_and_carves_val():
    y = _labels(unlabelled=0.1)
    store = np.where(np.arange(len(y)) % 5 == 0, "test", "train").astype(object)
    s = resolve_split(store, y, None, "stratified", 0.2, 0.1, 0)
    lab = y >= 0
    # Test rows untouched, val carved out of train only, unlabelled rows blanked.
    np.testing.assert_array_equal(s[lab & (store == "test")], "test")
    assert np.all(store[s == "val"] == "train")
    assert np.all(s[~lab] == "")
    n_train_store = np.sum(lab & (store == "train"))
    assert np.sum(s == "val") / n_train_store == pytest.approx(0.1, abs=0.01)


def test_resolve_split_keeps_full_store_and_aliases():
    y = _labels(n=300)
    store = np.array([b"train", b"valid", b"test"] * 100)
    s = resolve_split(store, y, None, "stratified", 0.2, 0.1, 0)
    np.testing.assert_array_equal(s, np.array(["train", "val", "test"] * 100))


def test_resolve_split_user_mode_carves_user_disjoint_val():
    y = _labels(n=2000)
    u = _users(y)
    base = make_split(y, users=u, mode="user", val_fraction=0.0, seed=2)
    s = resolve_split(base, y, u, "user", 0.2, 0.1, 0)
    assert "val" in set(s)
    assert set(u[s == "val"]).isdisjoint(u[s == "train"])
    assert set(u[s == "val"]).isdisjoint(u[s == "test"])


def test_resolve_split_falls_back_to_make_split():
    y = _labels()
    for store in (None, np.full(len(y), "")):
        np.testing.assert_array_equal(resolve_split(store, y, None, "stratified", 0.2, 0.1, 4),
                                      make_split(y, seed=4))


def test_resolve_split_errors():
    y = _labels(n=100)
    with pytest.raises(ValueError, match="no \\['test'\\]"):
        resolve_split(np.full(100, "train"), y, None, "stratified", 0.2, 0.1, 0)
    with pytest.raises(ValueError, match="unknown value"):
        resolve_split(np.full(100, "holdout"), y, None, "stratified", 0.2, 0.1, 0)


def test_a_class_with_one_post_stays_in_training():
    """A place with a single post cannot be stratified: it is kept for training (a warning names it), never lost."""
    from sgmft.errors import SgmftWarning

    y = np.array([0] * 20 + [1] * 20 + [2])                  # class 2 has one post
    with pytest.warns(SgmftWarning, match=r"class\(es\) 2 have one post among those the test split is carved"):
        split = make_split(y, test_fraction=0.25, val_fraction=0.2)
    assert split[40] == "train"
    assert (split != "").all() and {(split == s).sum() for s in ("train", "val", "test")} == {25, 6, 10}
    for c in (0, 1):                                         # the others are still stratified
        assert (split[y == c] == "test").sum() == 5
    # two posts: one may go to the test split, and the one left then stays in training for the val split
    y2 = np.array([0] * 20 + [1] * 20 + [2, 2])
    with pytest.warns(SgmftWarning):
        s2 = make_split(y2, test_fraction=0.5, val_fraction=0.5, seed=3)
    assert sorted(s2[40:]) == ["test", "train"]


def test_a_small_split_takes_one_post_per_class():
    """10 % of 50 posts is 5, too few to hold each of 8 classes once: the split takes 8 (a note says so)."""
    from sgmft.errors import SgmftNote

    y = np.arange(60) % 8
    with pytest.warns(SgmftNote, match=r"the val split takes 8 posts, one per class, instead of 5 \(10% of 48\)"):
        split = make_split(y, test_fraction=0.2, val_fraction=0.1)
    assert (split == "val").sum() == 8 and len(np.unique(y[split == "val"])) == 8
    assert (split == "test").sum() == 12
