"""``--engine ray`` (sgmft.features.ray_engine).

Fast tests (no Ray started): the CPU-stage copy of a backbone, the replica plan, the two
pipeline stages run by hand give the local engine's shard byte for byte, option checks,
the install hint. The slow test runs the real thing on a local Ray instance (2 CPUs): the
store is byte-identical to ``--engine local``, also after the Ray job is SIGKILLed mid-way
and run again.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sgmft.data.simposts import SimPostsConfig, generate_simposts
from sgmft.features.backbones import load_backbone
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.features.extract import _Cache, extract_features
from sgmft.features.shards import setup as _setup
from sgmft.features.extract_options import ExtractOptions
from sgmft.features import ray_engine as R
from sgmft.labels import DEFAULT_LABELS

BS = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("rayeng")
    ckpt = build_tiny_chinese_clip(root / "tinycc")
    manifest = generate_simposts(root / "posts", SimPostsConfig(num_posts=40, seed=11))
    return dict(root=root, spec=f"chinese-clip:{ckpt}", manifest=manifest)


def test_cpu_stage_drops_weights_and_prepares_the_same(env):
    import pickle

    import torch
    from PIL import Image

    bb = load_backbone(env["spec"], batch_size=BS)
    shim = R.cpu_stage(bb)
    assert shim.model is None and bb.model is not None            # the original keeps its model
    assert not any(isinstance(v, torch.nn.Module) for v in vars(shim).values())
    assert len(pickle.dumps(shim)) < len(pickle.dumps(bb))
    texts = ["今天 在 家里 吃饭", "健身房"]
    a, b = bb.tokenize(texts), shim.tokenize(texts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ims = [Image.new("RGB", (50, 40), (200, 30, 10))]
    assert torch.equal(bb.preprocess_images(ims), shim.preprocess_images(ims))


class _FakeRay:
    def __init__(self, cpus, gpus=0):
        self.res = {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}

    def cluster_resources(self):
        return self.res


def test_cluster_plan():
    p = R.cluster_plan(_FakeRay(16, 4), "auto", None, None)
    assert (p["actors"], p["num_gpus"], p["gpu"]) == (4, 1, True)              # one replica per GPU
    p = R.cluster_plan(_FakeRay(16, 4), "cpu", None, None)
    assert (p["gpu"], p["num_gpus"], p["threads"], p["actors"]) == (False, 0, 4, 3)  # device cpu: no GPUs
    p = R.cluster_plan(_FakeRay(2), "auto", None, None)
    # 2 cores: one replica of 2 threads that reserves 1 CPU, so a CPU task can run beside it
    assert (p["actors"], p["threads"], p["num_cpus"]) == (1, 2, 1)
    p = R.cluster_plan(_FakeRay(64), "auto", None, None)
    assert (p["actors"], p["threads"], p["num_cpus"]) == (12, 4, 4)
    p = R.cluster_plan(_FakeRay(64), "auto", 3, 8)
    assert (p["actors"], p["threads"], p["num_cpus"]) == (3, 8, 8)
    # replicas never reserve every CPU, whatever --actors/--threads say (CPU tasks must run)
    for cpus, actors, threads in ((16, 8, 2), (2, 4, 1), (2, 2, 2), (4, 1, 8), (1, 1, 1)):
        p = R.cluster_plan(_FakeRay(cpus), "auto", actors, threads)
        assert p["actors"] * p["num_cpus"] <= max(cpus - 1, 0.01 * actors) and p["num_cpus"] > 0, (cpus, actors, p)


def test_stages_by_hand_write_the_local_shard(env, tmp_path):
    """_prepare_row then a replica (what the Ray pipeline runs, without Ray) write the very
    shard file the local engine writes for the same batch, and a second pass finds it done."""
    local = extract_features(env["manifest"], tmp_path / "loc", backbone=env["spec"], batch_size=BS, threads=1,
                             progress=False, cache_dir=tmp_path / "loc.cache")
    bb = load_backbone(env["spec"], batch_size=BS)
    info = R.BackboneInfo.of(bb)
    cleaner, prefix, cache = _setup(info, ExtractOptions(cache_dir=tmp_path / "ray.cache", max_images=9))
    spill, splits, rejects = R.spill_manifest(env["manifest"], tmp_path / "posts.spill", BS,
                                              ExtractOptions().reader_options())
    from sgmft.ingest.manifest import read_manifest

    posts = read_manifest(env["manifest"], on_error="skip")[0]
    assert splits.n == len(posts) and spill.n_batches == (len(posts) + BS - 1) // BS and rejects == []
    ctx = dict(stage=R.cpu_stage(bb), clean_cfg=cleaner.cfg, image_choice="similar", max_pixels=local_max_pixels(),
               base=env["manifest"].resolve().parent, on_error="skip", max_images=9, prefix=prefix,
               cache_root=str(cache.root), cache_salt=cache.salt)
    rep = R._ExtractReplica(env["spec"], "cpu", "auto", BS, 1, "similar", str(cache.root), cache.salt,
                            info.fingerprint())
    import pickle

    for b in (0, 3):
        row = R._prepare_row({"b": b, "posts": pickle.dumps(posts[b * BS:(b + 1) * BS])}, ctx)
        assert row["payload"]                                   # not cached yet: a prepared batch
        out = rep(_np_batch(row))
        keys = json.loads(row["keys"])
        assert out["shard"][0] == cache.path(keys).name and int(out["posts"][0]) == BS
        assert int(out["n"][0]) == len(keys) == BS
        assert filecmp.cmp(cache.path(keys), _Cache(tmp_path / "loc.cache", cache.salt).path(keys), shallow=False)
        again = R._prepare_row({"b": b, "posts": pickle.dumps(posts[b * BS:(b + 1) * BS])}, ctx)
        assert again["payload"] == b"" and json.loads(again["keys"]) == keys   # resume: found by content
        # the streaming driver's rows: a batch index whose posts the task reads from the spill file
        assert spill.batch(b) == posts[b * BS:(b + 1) * BS]
        spilled = R._prepare_row({"id": b}, dict(ctx, spill=str(spill.path), spill_offsets=spill.offsets))
        assert (spilled["b"], spilled["keys"], spilled["payload"]) == (b, again["keys"], b"")
        assert int(rep(_np_batch(again))["n"][0]) == 0
    from sgmft.errors import BackboneMismatchError      # the same class as the local engine's

    # a node with other weights is refused: every batch comes back with the error, which the
    # driver raises as itself (an exception in the actor's constructor would be Ray's ActorDiedError)
    bad = R._ExtractReplica(env["spec"], "cpu", "auto", BS, 1, "similar", str(cache.root), cache.salt, "0" * 64)
    row = R._prepare_row({"b": 0, "posts": pickle.dumps(posts[:BS])}, ctx)
    err = pickle.loads(bad(_np_batch(row))["error"][0])
    assert type(err) is BackboneMismatchError and "fingerprint" in str(err)


def test_streaming_assembly_from_spill_and_shards_equals_local(env, tmp_path, monkeypatch):
    """The Ray driver's bounded-memory half without Ray: the manifest streamed into a spill file
    (one batch per record), then the spilled posts and the shards streamed batch by batch into
    the store, with the store writer dropping its pages every few rows, give the local
    engine's store file for file, byte for byte, and the same rejects."""
    import time

    import sgmft.features.store as S
    from sgmft.features.shards import StoreTarget as _Target
    from sgmft.features.shards import assemble_store as _assemble
    from sgmft.features.shards import post_key as _post_key

    local = extract_features(env["manifest"], tmp_path / "loc", backbone=env["spec"], batch_size=BS, threads=1,
                             progress=False, cache_dir=tmp_path / "loc.cache")
    bb = load_backbone(env["spec"], batch_size=BS)
    cleaner, prefix, cache = _setup(bb, ExtractOptions(cache_dir=tmp_path / "loc.cache"))
    opts = ExtractOptions().reader_options()
    spill, splits, rejects = R.spill_manifest(env["manifest"], tmp_path / "p.spill", BS, opts)
    assert spill.n_batches == (local.num_posts + BS - 1) // BS and splits.n == local.num_posts
    names = [cache.path([_post_key(prefix, p) for p in spill.batch(b)]).name.encode() for b in range(spill.n_batches)]
    monkeypatch.setattr(S, "_CHUNK_BYTES", 256)      # page release after (nearly) every scan chunk
    monkeypatch.setattr(S, "_RELEASE_BYTES", 256)    # and every write
    parts = ((spill.batch(b), R._shard_named(cache, names[b])) for b in range(spill.n_batches))
    target = _Target(tmp_path / "asm", bb, cleaner, "similar", DEFAULT_LABELS, env["manifest"], None, False,
                     cache.root)
    res = _assemble(target, parts, splits, rejects, 0, 0, 1, time.perf_counter())
    files = sorted(p.name for p in (tmp_path / "loc").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "asm").iterdir()) and "ids.utf8.npy" in files
    assert all(filecmp.cmp(tmp_path / "loc" / f, tmp_path / "asm" / f, shallow=False) for f in files)
    assert (res.num_posts, res.rejects) == (local.num_posts, local.rejects)
    from sgmft.features.extract import CorruptShardError

    with pytest.raises(CorruptShardError, match="does not hold the posts its name says"):
        (cache.shards / names[0].decode()).rename(cache.shards / ("0" * 40 + ".npz"))
        cache.get_named("0" * 40 + ".npz")


def local_max_pixels():
    from sgmft.ingest.images import DEFAULT_MAX_PIXELS

    return DEFAULT_MAX_PIXELS


def _np_batch(row):
    return {"b": np.asarray([row["b"]]), "keys": np.asarray([row["keys"]], dtype=object),
            "payload": np.asarray([row["payload"]], dtype=object), "error": np.asarray([row["error"]], dtype=object)}


def test_user_error_in_a_task_reaches_the_driver_as_itself(env, tmp_path):
    """--strict: a bad image in a CPU task comes back as the ImageLoadError itself (the CLI
    then prints `sgmft extract: error: ...`, exit 2, as with the local engine), through the
    replica, instead of as Ray's wrapper that loses the type."""
    import pickle

    from sgmft.errors import ImageLoadError
    from sgmft.ingest.manifest import read_manifest
    from sgmft.ingest.text import CleanConfig

    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "a", "text": "学校", "images": ["bad.jpg"]}) + "\n", encoding="utf-8")
    posts, _ = read_manifest(m)
    bb = load_backbone(env["spec"], batch_size=BS)
    ctx = dict(stage=R.cpu_stage(bb), clean_cfg=CleanConfig(), image_choice="similar", max_pixels=local_max_pixels(),
               base=tmp_path, on_error="raise", max_images=9, prefix=None, cache_root=None)
    row = R._prepare_row({"b": 0, "posts": pickle.dumps(posts)}, ctx)
    assert row["error"] and row["payload"] == b""
    e = pickle.loads(row["error"])
    assert isinstance(e, ImageLoadError) and e.reason.startswith("not an image") and e.path.name == "bad.jpg"
    rep = R._Replica.__new__(R._Replica)          # the error row passes any replica untouched
    out = rep(_np_batch(row))
    assert int(out["n"][0]) == 0 and pickle.loads(out["error"][0]).reason == e.reason


def test_engine_option_checks(env, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="num-processes"):
        R.extract_features_ray(env["manifest"], tmp_path / "s", backbone=env["spec"], num_processes=2, progress=False)
    with pytest.raises(ValueError, match="image_choice"):      # extract_features' own checks apply
        R.extract_features_ray(env["manifest"], tmp_path / "s", backbone=env["spec"], image_choice="best")
    with pytest.raises(ValueError, match="the manifest"):      # an output naming the manifest, before anything runs
        R.extract_features_ray(env["manifest"], tmp_path / "s", backbone=env["spec"], rejects_path=env["manifest"])
    monkeypatch.setitem(sys.modules, "ray", None)                  # Ray not installed
    with pytest.raises(ImportError, match=r"sgmft\[ray\]"):
        R.extract_features_ray(env["manifest"], tmp_path / "s", backbone=env["spec"], progress=False)
    assert not (tmp_path / "s").exists()


def test_cli_ray_flags_need_engine_ray(env, tmp_path, capsys):
    from sgmft.cli import main

    rc = main(["extract", str(env["manifest"]), "--out", str(tmp_path / "s"), "--backbone", env["spec"],
               "--address", "auto"])
    assert rc == 2 and "--engine ray" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    (tmp_path / "run").mkdir()
    rc = main(["predict", str(tmp_path / "run"), "--store", str(tmp_path / "x"), "--out", str(tmp_path / "p.csv"),
               "--engine", "ray"])
    assert rc == 2 and "--engine ray is for --manifest" in capsys.readouterr().err
    rc = main(["predict", str(tmp_path / "run"), "--manifest", str(env["manifest"]), "--out", str(tmp_path / "p.csv"),
               "--actors", "2"])
    assert rc == 2 and "need --engine ray" in capsys.readouterr().err


# -- the real thing -----------------------------------------------------------------------------
def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "sgmft.cli", *map(str, args)]


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), f"{n} differs"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_engine_byte_identical_and_resumes_after_sigkill(tmp_path):
    pytest.importorskip("ray.data", reason="Ray Data not installed (pip install 'sgmft[ray]')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    ckpt = build_tiny_chinese_clip(tmp_path / "tinycc")
    spec = f"chinese-clip:{ckpt}"
    manifest = generate_simposts(tmp_path / "posts", SimPostsConfig(num_posts=300, seed=5))
    common = ["--backbone", spec, "--batch-size", BS, "--threads", 1, "--no-progress", "--json"]
    local = subprocess.run(_cli("extract", manifest, "--out", tmp_path / "local", *common), env=env,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    n_posts = json.loads(local.stdout)["num_posts"]
    n_batches = (n_posts + BS - 1) // BS
    assert n_posts >= 250

    ray_args = _cli("extract", manifest, "--out", tmp_path / "ray", *common, "--engine", "ray", "--ray-cpus", 2)
    shards = tmp_path / "ray.cache" / "shards"
    # 1. start, and SIGKILL the whole job (driver, local Ray, its workers) once some shards exist
    proc = subprocess.Popen(ray_args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if shards.is_dir() and len(list(shards.glob("*.npz"))) >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the Ray job ended before it could be killed: {proc.stderr.read()[-3000:]}"
        assert shards.is_dir() and len(list(shards.glob("*.npz"))) >= 4, "no shards within the time limit"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
        proc.stderr.close()
    done = len(list(shards.glob("*.npz")))
    assert 4 <= done < n_batches and not (tmp_path / "ray").exists()

    # 2. the same command again: resumes from the finished shards, and the store is the local one
    again = subprocess.run(ray_args, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    s = json.loads(again.stdout)
    assert s["engine"] == "ray" and s["num_posts"] == n_posts
    assert s["cached"] >= done * BS - BS and s["encoded"] == n_posts - s["cached"] and s["encoded"] > 0
    assert s["ray"]["actors"] == 1 and s["ray"]["threads"] == 1
    _same_files(tmp_path / "local", tmp_path / "ray")
    assert sorted(p.name for p in shards.glob("*.npz")) == \
        sorted(p.name for p in (tmp_path / "local.cache" / "shards").glob("*.npz"))
    assert filecmp.cmp(tmp_path / "local.rejects.jsonl", tmp_path / "ray.rejects.jsonl", shallow=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_predict_manifest_ray_writes_the_local_files(tmp_path):
    """`sgmft predict RUN --manifest M --engine ray` writes the predictions and rejects files
    of the local engine, byte for byte, on a dirty corpus (bad rows and images included)."""
    pytest.importorskip("ray.data", reason="Ray Data not installed (pip install 'sgmft[ray]')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    spec = f"chinese-clip:{build_tiny_chinese_clip(tmp_path / 'tinycc')}"
    clean = generate_simposts(tmp_path / "clean", SimPostsConfig(num_posts=80, seed=2))
    dirty = generate_simposts(tmp_path / "dirty", SimPostsConfig(num_posts=60, dirty=True, seed=4))

    def run(*args, timeout=400):
        r = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    run("extract", clean, "--out", tmp_path / "store", "--backbone", spec, "--batch-size", BS, "--no-progress")
    run("train", tmp_path / "store", "--out", tmp_path / "run", "--preset", "sgmft", "--set", "model.n_tokens=8", "--epochs", 2,
        "--batch-size", 32, "--no-progress")
    for fmt in ("csv", "jsonl"):
        common = ["predict", tmp_path / "run", "--manifest", dirty, "--batch-size", BS, "--threads", 1,
                  "--no-progress", "--json"]
        loc = json.loads(run(*common, "--out", tmp_path / f"local.{fmt}"))
        ray = json.loads(run(*common, "--out", tmp_path / f"ray.{fmt}", "--engine", "ray", "--ray-cpus", 2))
        assert ray["ray"]["actors"] == 1 and loc["posts"] == ray["posts"] > 0 and loc["rejects"] == ray["rejects"] > 0
        assert filecmp.cmp(tmp_path / f"local.{fmt}", tmp_path / f"ray.{fmt}", shallow=False)
        assert filecmp.cmp(tmp_path / "local.rejects.jsonl", tmp_path / "ray.rejects.jsonl", shallow=False)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_predict_ray_resumes_after_sigkill(tmp_path):
    """`sgmft predict --engine ray` killed mid-way (SIGKILL of the whole job) and run again
    reuses the finished feature shards and writes the local engine's output byte for byte."""
    pytest.importorskip("ray.data", reason="Ray Data not installed (pip install 'sgmft[ray]')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    spec = f"chinese-clip:{build_tiny_chinese_clip(tmp_path / 'tinycc')}"
    clean = generate_simposts(tmp_path / "clean", SimPostsConfig(num_posts=60, seed=2))
    posts = generate_simposts(tmp_path / "posts", SimPostsConfig(num_posts=240, seed=6))

    def run(*args, timeout=900):
        r = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    run("extract", clean, "--out", tmp_path / "store", "--backbone", spec, "--batch-size", BS, "--no-progress")
    run("train", tmp_path / "store", "--out", tmp_path / "run", "--preset", "sgmft", "--set", "model.n_tokens=8",
        "--epochs", 1,
        "--batch-size", 32, "--no-progress")
    common = ["predict", tmp_path / "run", "--manifest", posts, "--batch-size", BS, "--threads", 1,
              "--no-progress", "--json"]
    loc = json.loads(run(*common, "--out", tmp_path / "local.csv"))
    n_batches = (loc["posts"] + BS - 1) // BS
    ray_args = _cli(*common, "--out", tmp_path / "ray.csv", "--engine", "ray", "--ray-cpus", 2)
    shards = tmp_path / "ray.csv.cache" / "shards"
    proc = subprocess.Popen(ray_args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if shards.is_dir() and len(list(shards.glob("*.npz"))) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the Ray job ended before it could be killed: {proc.stderr.read()[-3000:]}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
        proc.stderr.close()
    done = len(list(shards.glob("*.npz")))
    assert 3 <= done < n_batches and not (tmp_path / "ray.csv").exists()
    again = json.loads(run(*ray_args[3:], timeout=600))
    assert again["ray"]["cached"] >= (done - 1) * BS and again["ray"]["encoded"] == loc["posts"] - again["ray"]["cached"]
    assert again["ray"]["encoded"] > 0 and again["posts"] == loc["posts"]
    assert filecmp.cmp(tmp_path / "local.csv", tmp_path / "ray.csv", shallow=False)
    assert filecmp.cmp(tmp_path / "local.rejects.jsonl", tmp_path / "ray.rejects.jsonl", shallow=False)
    assert not (tmp_path / "ray.csv.cache").exists()   # removed after the successful run
