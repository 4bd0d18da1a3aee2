"""sgmft.card: the model card names the store of each figure (new-user item 3 of issue 19)."""

from __future__ import annotations

import pytest

from conftest import make_store
from sgmft.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from sgmft.config import apply_overrides, load_preset
    from sgmft.train import train

    root = tmp_path_factory.mktemp("card")
    store = make_store(root / "train-store", n=200, dim=16, k=4, with_split=True)
    other = make_store(root / "other-store", n=60, dim=16, k=4, seed=7)
    p = load_preset("concat")
    p.model = apply_overrides(p.model, ["classifier_hidden=[16]"])
    p.train.epochs, p.train.progress = 1, False
    train(store, root / "run", p)
    return {"store": store, "other": other, "run": root / "run"}


def test_card_names_the_store_of_each_evaluation(run, capsys):
    assert main(["evaluate", str(run["run"]), str(run["store"]), "--tsne-points", "20", "--no-progress"]) == 0
    assert main(["evaluate", str(run["run"]), str(run["other"]), "--split", "all", "--tsne-points", "20",
                 "--no-progress"]) == 0
    capsys.readouterr()
    card = (run["run"] / "model" / "README.md").read_text(encoding="utf-8")
    rows = [line for line in card.splitlines() if "(`sgmft evaluate`)" in line]
    assert len(rows) == 2, rows
    test_row = next(r for r in rows if "| test " in r)
    all_row = next(r for r in rows if "| all " in r)
    assert "`train-store` (training store)" in test_row
    assert "`other-store`" in all_row and "training store" not in all_row
    assert "on the store named in Data" not in card and "on the store named in its row" in card
    # the model-index of the front matter names each dataset too
    front = card.split("---")[1]
    assert "name: other-store" in front and "name: train-store" in front
