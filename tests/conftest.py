import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_store(path, n=400, dim=32, k=4, seed=0, with_split=False, masks=False, users=True):
    """A small labelled store whose classes are separable, for training tests."""
    from sgmft.features import write_feature_store

    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    proto_t, proto_i = rng.normal(size=(k, dim)), rng.normal(size=(k, dim))
    text = proto_t[y] + 0.8 * rng.normal(size=(n, dim))
    image = proto_i[y] + 0.8 * rng.normal(size=(n, dim))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    kw = {}
    if with_split:
        kw["split"] = np.where(np.arange(n) % 5 == 0, "test", np.where(np.arange(n) % 5 == 1, "val", "train"))
    if masks:
        kw["text_mask"] = rng.random(n) > 0.1
        kw["image_mask"] = rng.random(n) > 0.1
        text[~kw["text_mask"]] = 0
        image[~kw["image_mask"]] = 0
    if users:
        kw["users"] = np.array([f"u{i % 20}" for i in range(n)])
    return write_feature_store(path, ids=np.array([f"p{i}" for i in range(n)]), text=text.astype(np.float32),
                               image=image.astype(np.float32), labels=y,
                               label_names=[f"c{i}" for i in range(k)], backbone="test", **kw)


@pytest.fixture
def small_store(tmp_path):
    return make_store(tmp_path / "store")
