"""``sgmft demo-raw``: the raw-post pipeline end to end, offline, in a few minutes on 2 CPU cores.

1. generate SimPosts (Weibo-like posts: noisy Chinese text + image files), clean;
2. build a tiny RANDOM Chinese-CLIP checkpoint (unless ``backbone`` names real weights);
3. ``extract`` features (text cleaning, robust image loading, image choice, masks);
4. ``train`` the recommended SG-MFT preset (``n_tokens`` adjusted so it divides D);
5. ``evaluate`` on the held-out test split;
6. predict a small *dirty* SimPosts corpus (broken rows, broken images) -> rejects file;
7. predict 5 newly generated posts one by one, as ``sgmft predict RUN --text --image`` would.

With the random tiny backbone the features are random projections: the numbers show that
the pipeline works, not what a real Chinese-CLIP model achieves.
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

RANDOM_BACKBONE_NOTE = (
    "NOTE: the backbone is a tiny RANDOMLY initialised Chinese-CLIP (no download). Its features are\n"
    "      random projections, so the accuracy below shows that the pipeline works end to end, NOT\n"
    "      the accuracy of SG-MFT on real Chinese-CLIP features. Pass --backbone chinese-clip:<dir>\n"
    "      with real weights for meaningful numbers.")


def _say(msg: str) -> None:
    print(f"[demo-raw] {msg}", flush=True)


def pick_n_tokens(dim: int, preferred: int = 16) -> int:
    """``preferred`` if it divides ``dim``, else the largest divisor of ``dim`` below it."""
    if dim % preferred == 0:
        return preferred
    return max(n for n in range(1, min(preferred, dim) + 1) if dim % n == 0)


def run_raw_demo(out_dir="reports/demo-raw", *, backbone: str | None = None, num_posts: int = 600,
                 epochs: int = 30, new_posts: int = 5, dirty_posts: int = 40, seed: int = 0,
                 progress: bool = True, threads: int | None = None) -> dict:
    """Run the raw demo into ``out_dir``; return a summary (also written to ``results.json``).

    ``threads``: torch / BLAS threads while the demo runs (default: half the CPU cores, at
    least 1). The models are small, and on a 2-core machine two torch threads next to the
    image-loading threads (or other jobs) run many times slower than one.
    """
    import torch
    from threadpoolctl import threadpool_limits

    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // 2)
    from sgmft.features.backbones.hf_clip import hf_progress_bars

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads), hf_progress_bars(progress):
            return _run(out_dir, backbone=backbone, num_posts=num_posts, epochs=epochs, new_posts=new_posts,
                        dirty_posts=dirty_posts, seed=seed, progress=progress)
    finally:
        torch.set_num_threads(old)


class _Laps:
    """Seconds per step of the demo (``results.json``'s ``timings_s``)."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.time()
        yield
        self.timings[name] = round(time.time() - t, 1)


def _backbone(out: Path, backbone: str | None, seed: int):
    """The loaded backbone: ``backbone``, or a tiny random Chinese-CLIP built into ``out``."""
    from sgmft.features.backbones import load_backbone

    if backbone is None:
        from sgmft.features.backbones.tiny import build_tiny_chinese_clip

        ckpt = build_tiny_chinese_clip(out / "tiny-chinese-clip", seed=seed)
        backbone = f"chinese-clip:{ckpt.resolve()}"
        _say(f"built a tiny random Chinese-CLIP -> {ckpt}")
        print(RANDOM_BACKBONE_NOTE, flush=True)
    bb = load_backbone(backbone)
    _say(f"backbone {bb.spec} (D={bb.dim}, {bb.device}, {bb.precision})")
    return bb


def _extract(manifest: Path, out: Path, bb, progress: bool):
    from sgmft.features.extract import extract_features

    store = out / "features"
    res = extract_features(manifest, store, backbone=bb, batch_size=32, rejects_path=out / "features.rejects.jsonl",
                           progress=progress, overwrite=True)
    _say(f"extracted {res.num_posts} posts -> {store} ({res.encoded} encoded, {res.cached_hits} from cache, "
         f"{res.text_missing} without text, {res.image_missing} without image, {res.num_rejects} rejects; "
         f"{res.seconds:.1f} s)")
    return store, res


def _train(store: Path, run: Path, dim: int, *, epochs: int, seed: int, progress: bool):
    """Train the recommended SG-MFT preset, ``n_tokens`` adjusted to divide ``dim``; ``(result, n_tokens)``."""
    import dataclasses

    from sgmft.config import load_preset
    from sgmft.train import train

    preset = load_preset("sgmft")
    n_tokens = pick_n_tokens(dim, preset.model.n_tokens)
    preset.model = dataclasses.replace(preset.model, n_tokens=n_tokens)
    preset.train = dataclasses.replace(preset.train, epochs=epochs, progress=progress, seed=seed)
    shutil.rmtree(run, ignore_errors=True)   # a fresh run (train() would resume an old one)
    _say(f"training preset 'sgmft' (n_tokens={n_tokens}, token width {dim // n_tokens}) for {epochs} epochs")
    tr = train(store, run, preset)
    _say(f"trained -> {tr.checkpoint} (best val accuracy {tr.best_val_acc:.4f})"
         if tr.best_val_acc is not None else f"trained -> {tr.checkpoint}")
    return tr, n_tokens


def _evaluate(run: Path, store: Path) -> dict:
    from sgmft.eval.run import evaluate
    from sgmft.features import FeatureStore

    m = evaluate(run, store, run / "eval-test", split="test", tsne_max_points=300)
    k = len(FeatureStore.open(store).label_names)
    _say(f"test accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} on {m['num_samples']} posts "
         f"(chance {1 / k:.3f}); report in {run / 'eval-test'}")
    return m


def _predict_dirty(pp, out: Path, dirty_posts: int, seed: int) -> dict:
    """A dirty SimPosts corpus through ``predict --manifest``; prints the first rejects."""
    from sgmft.data.simposts import SimPostsConfig, generate_simposts

    dirty = generate_simposts(out / "simposts-dirty", SimPostsConfig(num_posts=dirty_posts, dirty=True,
                                                                       seed=seed + 7), overwrite=True)
    s = pp.predict_manifest(dirty, out / "dirty-predictions.jsonl", out / "dirty-predictions.rejects.jsonl")
    _say(f"dirty corpus: {s['posts']} posts predicted -> {s['out']}; {s['rejects']} rejects "
         f"({s['rows_rejected']} rows skipped, {s['images_rejected']} images unusable) -> {s['rejects_path']}")
    rej = [json.loads(line) for line in Path(s["rejects_path"]).read_text(encoding="utf-8").splitlines()]
    for r in rej[:8]:
        print(f"    line {r['line']:>3} [{r['id'] or '-'}] {r['field']}: {r['reason']}"[:120], flush=True)
    if len(rej) > 8:
        print(f"    ... {len(rej) - 8} more", flush=True)
    return s


def _predict_new(pp, out: Path, run: Path, new_posts: int, seed: int) -> list[dict]:
    """Newly generated posts, one by one (``sgmft predict RUN --text --image``); their results."""
    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.ingest.manifest import read_manifest

    new = generate_simposts(out / "new-posts", SimPostsConfig(num_posts=new_posts, seed=seed + 1000, split=None),
                            overwrite=True)
    posts, _ = read_manifest(new)
    with open(new.parent / "truth.jsonl", encoding="utf-8") as f:
        truth = {d["id"]: d for d in map(json.loads, f)}
    _say(f"predicting {len(posts)} new posts (like `sgmft predict {run} --text ... --image ...`):")
    examples = []
    for p in posts:
        r = pp.predict_post(p.text, [str(x) for x in p.images])
        tl = truth[p.id]
        examples.append({"id": p.id, "text": p.text, "images": [os.path.relpath(x, out) for x in p.images],
                         "true_label": tl["true_label"], "regime": tl["regime"], **r})
        snippet = p.text.replace("\n", " ")
        snippet = snippet[:28] + "…" if len(snippet) > 28 else snippet
        print(f"    {p.id}  true {tl['true_label']:<10s} predicted {r['label']:<10s} p={r['prob']:.2f}  "
              f"[{len(p.images)} image(s), informative: {tl['regime']}]  {snippet}", flush=True)
        for w in r["warnings"]:
            print(f"        warning: {w}", flush=True)
    return examples


def _run(out_dir, *, backbone, num_posts, epochs, new_posts, dirty_posts, seed, progress) -> dict:
    """The seven steps of the module doc, each timed; the summary, written to ``results.json``."""
    from sgmft.atomic import write_text
    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.predict import PostPredictor

    if num_posts < 40:
        raise InputError("--posts must be at least 40 (every place needs training and test posts)")
    t0, lap = time.time(), _Laps()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with lap("generate"):
        manifest = generate_simposts(out / "simposts", SimPostsConfig(num_posts=num_posts, seed=seed), overwrite=True)
        _say(f"generated {num_posts} SimPosts -> {manifest}")
    bb = _backbone(out, backbone, seed)
    with lap("extract"):
        store, res = _extract(manifest, out, bb, progress)
    run = out / "run"
    with lap("train"):
        tr, n_tokens = _train(store, run, bb.dim, epochs=epochs, seed=seed, progress=progress)
    with lap("evaluate"):
        m = _evaluate(run, store)
    with lap("predict_dirty"):
        pp = PostPredictor.load(run, backbone=bb)
        s = _predict_dirty(pp, out, dirty_posts, seed)
    with lap("predict_new"):
        examples = _predict_new(pp, out, run, new_posts, seed)
    summary = {"out": str(out), "backbone": bb.spec, "random_backbone": backbone is None, "dim": bb.dim,
               "num_posts": num_posts, "epochs": epochs, "n_tokens": n_tokens,
               "extract": {"posts": res.num_posts, "rejects": res.num_rejects, "text_missing": res.text_missing,
                           "image_missing": res.image_missing},
               "best_val_acc": tr.best_val_acc, "test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"],
               "dirty": s, "new_posts": examples, "timings_s": lap.timings, "seconds": round(time.time() - t0, 1)}
    write_text(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False))
    if backbone is None:
        print(RANDOM_BACKBONE_NOTE, flush=True)
    _say(f"done in {summary['seconds']:.0f} s; summary in {out / 'results.json'}")
    return summary
