"""Run folders that cannot hurt you (issue 9): resume never unpickles, checks what it resumes
(fingerprint), leaves a complete run alone, keeps the metrics history, locks out a second
writer, and a SIGKILL at any point followed by a resume ends bit-identical to a run that went
straight through."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sgmft.cli import main as cli_main
from sgmft.errors import SgmftNote
from sgmft.runs import RunDir, RunError, RunLock
from sgmft.train import train
from sgmft.train.resume import ResumeCheckpointError, load_state, save_state

from resume_support import tiny_preset, tiny_store

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def preset_yaml(path: Path, **train_kw) -> Path:
    d = tiny_preset(**train_kw).to_dict()
    path.write_text(yaml.safe_dump({"model": d["model"], "train": d["train"]}), encoding="utf-8")
    return path


@pytest.fixture
def store(tmp_path):
    return tiny_store(tmp_path / "store")


# -- the resume format: safetensors + JSON, never a pickle --------------------------------------
def test_resume_state_round_trips_every_type_without_pickle(tmp_path):
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": torch.tensor(3.0),
             "opt": {0: {"exp_avg": torch.ones(2)}, 1: {}}, "betas": (0.9, 0.99), "name": "x",
             "flags": [True, None, 2, 2.5], "nested": {"a": [(1, "b")]}, "rng": torch.get_rng_state()}
    p = save_state(state, tmp_path / "s.ckpt")
    back = load_state(p)
    assert back["opt"][0]["exp_avg"].tolist() == [1.0, 1.0] and set(back["opt"]) == {0, 1}
    assert back["betas"] == (0.9, 0.99) and back["flags"] == [True, None, 2, 2.5]
    assert back["nested"] == {"a": [(1, "b")]} and back["name"] == "x"
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["rng"], state["rng"])
    assert p.read_bytes()[8:9] == b"{"              # a safetensors header, not a zip/pickle
    with pytest.raises(TypeError, match="cannot store a object at checkpoint"):
        save_state({"bad": object()}, tmp_path / "t.ckpt")


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _interrupted_run(store, tmp_path) -> RunDir:
    """A real run folder, marked as still running (as after a kill), with its last.ckpt."""
    run = RunDir(tmp_path / "run")
    train(store, run.root, tiny_preset(epochs=1))
    info = json.loads(run.run_json.read_text())
    info["status"] = "running"
    run.run_json.write_text(json.dumps(info))
    return run


def test_planted_pickle_checkpoint_is_refused_and_never_runs(store, tmp_path, capsys):
    run = _interrupted_run(store, tmp_path)
    marker = tmp_path / "PWNED"
    # the plant is live: an unpickling loader would run it
    probe = tmp_path / "probe.ckpt"
    torch.save({"state_dict": _Payload(tmp_path / "probe-marker")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-marker").exists()
    torch.save({"state_dict": _Payload(marker), "epoch": 0}, run.last_checkpoint)
    before = snapshot(run.root)

    with pytest.raises(ResumeCheckpointError, match="never unpickles") as e:
        train(store, run.root, tiny_preset(epochs=1))
    assert str(run.last_checkpoint) in str(e.value) and "--overwrite" in str(e.value)
    assert not marker.exists()
    # the CLI: one line, exit 2
    rc = cli_main(["train", str(store), "--out", str(run.root), "--preset",
                   str(preset_yaml(tmp_path / "tiny.yaml", epochs=1))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("sgmft train: error: ") and "\n" not in err and "last.ckpt" in err
    assert not marker.exists()
    assert snapshot(run.root) == before                     # nothing was touched
    # a raw pickle (not torch's zip) and a truncated file are refused the same way
    run.last_checkpoint.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ResumeCheckpointError, match="never unpickles"):
        train(store, run.root, tiny_preset(epochs=1))
    good = tmp_path / "good.ckpt"
    save_state({"x": torch.ones(1000)}, good)
    run.last_checkpoint.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ResumeCheckpointError, match="not a readable sgmft resume checkpoint"):
        train(store, run.root, tiny_preset(epochs=1))
    assert not marker.exists()
    # --overwrite starts again and succeeds
    res = train(store, run.root, tiny_preset(epochs=1), overwrite=True)
    assert res.status == "trained" and (run.model / "model.safetensors").exists()


def test_resume_checkpoint_of_another_run_is_refused(store, tmp_path):
    run = _interrupted_run(store, tmp_path)
    other = RunDir(tmp_path / "other")
    train(store, other.root, tiny_preset(epochs=1, seed=5))
    shutil.copy(other.last_checkpoint, run.last_checkpoint)   # a valid file, but not this run's
    with pytest.raises(ResumeCheckpointError, match="belongs to another run"):
        train(store, run.root, tiny_preset(epochs=1))


# -- fingerprint, complete runs, --overwrite -----------------------------------------------------
def test_complete_run_rerun_changes_nothing(store, tmp_path, capsys):
    y = preset_yaml(tmp_path / "tiny.yaml", epochs=2)
    out = tmp_path / "run"
    assert cli_main(["train", str(store), "--out", str(out), "--preset", str(y)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert cli_main(["train", str(store), "--out", str(out), "--preset", str(y)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert snapshot(out) == before                          # byte-identical, no lock left behind
    res = train(store, out, tiny_preset(epochs=2))
    assert res.status == "complete" and snapshot(out) == before


def test_different_fingerprint_is_refused_until_overwrite(store, tmp_path, capsys):
    y = preset_yaml(tmp_path / "tiny.yaml", epochs=1)
    out = tmp_path / "run"
    assert cli_main(["train", str(store), "--out", str(out), "--preset", str(y)]) == 0
    before = snapshot(out)
    capsys.readouterr()
    # another learning rate
    assert cli_main(["train", str(store), "--out", str(out), "--preset", str(y), "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.lr: 0.003 -> 0.01" in err and "--overwrite" in err and "new --out" in err
    # another store (same ids and shapes, other features)
    other = tiny_store(tmp_path / "store2", seed=7)
    assert cli_main(["train", str(other), "--out", str(out), "--preset", str(y)]) == 2
    assert "store contents" in capsys.readouterr().err
    # another seed
    with pytest.raises(RunError, match="train.seed: 0 -> 3"):
        train(store, out, tiny_preset(epochs=1, seed=3))
    assert snapshot(out) == before
    # cosmetic settings do not count
    assert train(store, out, tiny_preset(epochs=1, progress=False, num_workers=0)).status == "complete"
    # --overwrite replaces the run; a user's own file beside it survives
    (out / "notes.txt").write_text("mine")
    assert cli_main(["train", str(store), "--out", str(out), "--preset", str(y), "--lr", "0.01",
                     "--overwrite"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["lr"] == 0.01 and run["status"] == "complete"
    assert (out / "notes.txt").read_text() == "mine"


def test_users_files_are_never_deleted_and_unknown_run_states_refused(store, tmp_path):
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    for over in (False, True):
        res = train(store, mine, tiny_preset(epochs=1, seed=int(over)), overwrite=over)
        assert res.status == "trained" and (mine / "thesis.tex").read_text() == "x"
    # sgmft's files without a run.json: a state that cannot be checked
    (mine / "run.json").unlink()
    with pytest.raises(RunError, match="but no run.json, so it cannot be checked or resumed"):
        train(store, mine, tiny_preset(epochs=1))
    legacy = tmp_path / "legacy"
    train(store, legacy, tiny_preset(epochs=1))
    info = json.loads((legacy / "run.json").read_text())
    del info["fingerprint"]                                  # as written by an older sgmft
    (legacy / "run.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="no fingerprint"):
        train(store, legacy, tiny_preset(epochs=1))


def _crash_after_epoch(monkeypatch, epoch: int) -> None:
    from sgmft.train.resume import RunRecorder

    orig = RunRecorder.on_train_epoch_end

    def crash(self, trainer, module):
        orig(self, trainer, module)
        if trainer.current_epoch == epoch:
            raise KeyError("simulated crash")

    monkeypatch.setattr(RunRecorder, "on_train_epoch_end", crash)


def test_metrics_history_survives_a_resume(store, tmp_path, monkeypatch):
    """Kill (simulated by an exception) after epoch 1, with last.ckpt after every epoch; the resumed run keeps
    epochs 0-1's rows."""
    import sgmft.train.resume as R

    monkeypatch.setattr(R, "CHECKPOINT_EVERY_S", 0.0)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_after_epoch(m, 1)
        with pytest.raises(KeyError):
            train(store, out, tiny_preset(epochs=3))
    rows = (out / "lightning" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1"]
    with pytest.warns(SgmftNote, match=r"resuming after 2 finished epoch\(s\) of 3"):
        res = train(store, out, tiny_preset(epochs=3))
    assert res.status == "resumed"
    rows2 = (out / "lightning" / "metrics.csv").read_text().splitlines()
    assert rows2[:3] == rows[:3] and [r.split(",")[0] for r in rows2[1:]] == ["0", "1", "2"]
    ref = train(store, tmp_path / "ref", tiny_preset(epochs=3))
    assert (ref.run_dir / "lightning" / "metrics.csv").read_bytes() == (out / "lightning" / "metrics.csv").read_bytes()
    assert ((ref.checkpoint / "model.safetensors").read_bytes()
            == (res.checkpoint / "model.safetensors").read_bytes())


def test_checkpoints_are_spaced_in_time_and_a_resume_redoes_the_epochs_since(store, tmp_path, monkeypatch):
    """By default last.ckpt is written after the first epoch, the last, and when CHECKPOINT_EVERY_S have passed
    (tiny epochs: first and last only). A crash after epoch 2 of 4 resumes from epoch 0's checkpoint, redoes
    epochs 1-2, and ends with the bytes of a run never stopped."""
    import sgmft.train.resume as R

    monkeypatch.setattr(R, "CHECKPOINT_EVERY_S", 3600.0)
    saved = []
    orig_save = R.RunRecorder._checkpoint_due
    monkeypatch.setattr(R.RunRecorder, "_checkpoint_due",
                        lambda self, trainer, epoch: saved.append((epoch, orig_save(self, trainer, epoch))) or saved[-1][1])
    ref = train(store, tmp_path / "ref", tiny_preset(epochs=4))
    assert saved == [(0, True), (1, False), (2, False), (3, True)], saved
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_after_epoch(m, 2)
        with pytest.raises(KeyError):
            train(store, out, tiny_preset(epochs=4))
    # metrics.csv is written with last.ckpt: epoch 0's row; the resumed run redoes epochs 1-2
    assert [r.split(",")[0] for r in (out / "lightning" / "metrics.csv").read_text().splitlines()[1:]] == ["0"]
    with pytest.warns(SgmftNote, match=r"resuming after 1 finished epoch\(s\) of 4"):
        res = train(store, out, tiny_preset(epochs=4))
    assert res.status == "resumed"
    for f in ("model/model.safetensors", "lightning/metrics.csv", "lightning/checkpoints/best.safetensors"):
        assert (ref.run_dir / f).read_bytes() == (out / f).read_bytes(), f


# -- the writer's lock ---------------------------------------------------------------------------
HOLD = ("import sys, time; from sgmft.runs import RunDir, RunLock; "
        "l = RunLock(RunDir(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)")


def test_second_writer_is_stopped_and_a_dead_writers_lock_is_taken_over(store, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"another sgmft train is writing this run \(pid {holder.pid} "):
            train(store, out, tiny_preset(epochs=1))
        with pytest.raises(RunError, match="another sgmft train"):
            RunLock(RunDir(out)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / "run.lock").read_text())["pid"] == holder.pid      # stale lock left behind
    with pytest.warns(SgmftNote, match=rf"previous writer \(pid {holder.pid} .*no longer running; taking over"):
        res = train(store, out, tiny_preset(epochs=1))
    assert res.status == "trained" and not (out / "run.lock").exists()


# -- kill at several points, resume, compare byte for byte --------------------------------------
def _kill_then_resume(store, out: Path, kill: str, epochs: int = 4) -> None:
    r = subprocess.run([sys.executable, str(HERE / "resume_support.py"), kill, str(store), str(out), str(epochs)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == -signal.SIGKILL, (kill, r.returncode, r.stderr[-2000:])
    assert not (out / "model").exists() or kill == "export"
    res = train(store, out, tiny_preset(epochs))
    assert res.status == "resumed", kill


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bit_identical(store, tmp_path):
    """6 batches per epoch, 4 epochs. Kill mid-epoch (step 9 = epoch 1, batch 3), between
    epochs (after epoch 1's checkpoint), while writing epoch 2's last.ckpt, while exporting
    model/, after epoch 2 with the default spacing of checkpoints (the last from epoch 0), and once at a random moment; each resume must end with the same bytes."""
    ref = train(store, tmp_path / "ref", tiny_preset(4))
    want = {f: (ref.run_dir / f).read_bytes() for f in
            ("model/model.safetensors", "lightning/metrics.csv", "lightning/checkpoints/best.safetensors",
             "split.npy", "model/labels.json", "model/config.json")}
    for kill in ("step:9", "epoch:1", "ckpt-write:2", "export", "sparse/epoch:2"):
        out = tmp_path / kill.replace(":", "-").replace("/", "-")
        _kill_then_resume(store, out, kill)
        got = {f: (out / f).read_bytes() for f in want}
        assert got == want, (kill, [f for f in want if got[f] != want[f]])
        leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".") or p.name == "run.lock"]
        assert leftovers == [], (kill, leftovers)
    # a kill from outside at a random moment after the first epoch's checkpoint
    out = tmp_path / "random"
    proc = subprocess.Popen([sys.executable, str(HERE / "resume_support.py"), "none", str(store), str(out), "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while not (out / "lightning" / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = train(store, out, tiny_preset(4))
    assert res.status in ("resumed", "complete")
    assert (out / "model/model.safetensors").read_bytes() == want["model/model.safetensors"]
    assert (out / "lightning/metrics.csv").read_bytes() == want["lightning/metrics.csv"]


def test_epoch_order_depends_only_on_seed_and_epoch():
    from sgmft.train.data import EpochSampler

    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    orders = []
    for e in range(3):
        a.set_epoch(e)
        orders.append(list(a))
    b.set_epoch(2)
    assert list(b) == orders[2] and orders[0] != orders[1] != orders[2]
    assert sorted(orders[1]) == list(range(50))
    # the order of the DataLoader(shuffle=True, generator=seeded) it replaces, epoch by epoch
    # (47 rows in batches of 10: a partial last batch, so 2 permutations drawn per epoch)
    gen = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(np.arange(47), batch_size=10, shuffle=True, generator=gen)
    s = EpochSampler(47, seed=3, draws_per_epoch=2)
    for e in range(3):
        s.set_epoch(e)
        assert torch.cat(list(loader)).tolist() == list(s)
    # the sampler keeps the generator's state between epochs: an epoch served twice, an earlier epoch after a
    # later one, and the 40th epoch of a straight run all equal a fresh sampler's replay from the seed
    s.set_epoch(2)
    assert list(s) == list(s)
    s.set_epoch(1)
    fresh = EpochSampler(47, seed=3, draws_per_epoch=2)
    fresh.set_epoch(1)
    assert list(s) == list(fresh)
    for e in range(2, 40):
        s.set_epoch(e)
        order = list(s)
    fresh.set_epoch(39)
    assert order == list(fresh)


# -- hostile run folders: links and special files ------------------------------------------------
def test_links_and_special_files_in_a_run_folder_are_refused(store, tmp_path):
    victim = tmp_path / "bashrc"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").symlink_to(victim)                   # opening it for writing would truncate it
    with pytest.raises(RunError, match="run.lock: cannot be opened as the run's lock file"):
        train(store, out, tiny_preset(epochs=1))
    assert victim.read_text() == "precious"
    (out / "run.lock").unlink()

    run = _interrupted_run(store, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(run.lightning), elsewhere)
    run.lightning.symlink_to(elsewhere)                     # writes would land outside the run
    with pytest.raises(RunError, match="lightning: is a symbolic link"):
        train(store, run.root, tiny_preset(epochs=1))
    run.lightning.unlink()
    shutil.move(str(elsewhere), run.lightning)

    run.last_checkpoint.unlink()
    os.mkfifo(run.last_checkpoint)                          # reading it would block forever
    with pytest.raises(ResumeCheckpointError, match="last.ckpt: not a regular file"):
        train(store, run.root, tiny_preset(epochs=1))
    assert train(store, run.root, tiny_preset(epochs=1), overwrite=True).status == "trained"


def test_a_complete_run_can_be_extended_exactly_but_not_shortened(store, tmp_path):
    out = tmp_path / "run"
    assert train(store, out, tiny_preset(epochs=2)).status == "trained"
    res = train(store, out, tiny_preset(epochs=3))
    assert res.status == "resumed"
    assert json.loads((out / "run.json").read_text())["train"]["epochs"] == 3
    ref = train(store, tmp_path / "ref", tiny_preset(epochs=3))
    for f in ("model/model.safetensors", "lightning/metrics.csv"):
        assert (out / f).read_bytes() == (ref.run_dir / f).read_bytes(), f
    with pytest.raises(RunError, match="was started for 3 epochs and cannot be shortened to 2"):
        train(store, out, tiny_preset(epochs=2))
    assert train(store, out, tiny_preset(epochs=3)).status == "complete"
