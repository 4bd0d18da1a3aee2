"""Predict a posts manifest with a whole-post ONNX export, without torch or transformers.

    python -m sgmft.runner.onnx_runner EXPORT_DIR posts.jsonl --out predictions.jsonl

``EXPORT_DIR`` is what ``sgmft export RUN --with-backbone --format onnx --out EXPORT_DIR`` wrote.
Each post goes through the steps ``sgmft predict`` takes, with the same code where it is
torch-free: the manifest reader and image loader of :mod:`sgmft.ingest`, the text cleaning of
:mod:`sgmft.ingest.text` (jieba + stopwordsiso), the ``tokenizers`` file of the backbone's own
tokenizer laid out as ``export.json`` says (``truncate`` or ``head-tail`` long-text policy),
cn_clip's image transform (:mod:`sgmft.features.backbones.cn_clip_transform`, loaded by path so
that ``sgmft.features``, which imports torch, is never imported), then onnxruntime.
Needs: numpy, pillow, onnxruntime, tokenizers, jieba, stopwordsiso, and sgmft (``--no-deps``).
Writes one JSON line per post: ``{"id", "label", "confidence", "probs": {place: p}}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np


def _transform():
    import sgmft

    path = Path(sgmft.__file__).parent / "features" / "backbones" / "cn_clip_transform.py"
    spec = importlib.util.spec_from_file_location("_sgmft_cn_clip_transform", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class OnnxPostRunner:
    """A whole-post export loaded for prediction (see the module docstring)."""

    def __init__(self, export_dir, *, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from sgmft.ingest.text import CleanConfig, TextCleaner, parse_long_text

        d = Path(export_dir)
        self.meta = json.loads((d / "export.json").read_text(encoding="utf-8"))
        if self.meta.get("format") != "sgmft-whole-post-onnx":
            raise ValueError(f"{d / 'export.json'}: not a whole-post export (sgmft export --with-backbone)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = opts.inter_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(d / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        names = {f.name for f in dataclasses.fields(CleanConfig)}
        cc = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (self.meta["clean_config"] or {}).items()
              if k in names}
        self.cleaner = TextCleaner(CleanConfig(**cc))
        self.policy = parse_long_text(self.cleaner.cfg.long_text)
        self.labels = list(self.meta["labels"])
        self._tf = _transform()

    # -- inputs -------------------------------------------------------------------------------
    def token_arrays(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` / ``attention_mask`` (B, L) for cleaned texts ("" -> an all-pad row)."""
        t = self.meta["text"]
        L, budget, pre, post = t["max_length"], t["budget"], t["prefix_ids"], t["suffix_ids"]
        ids = np.full((len(texts), L), t["pad_id"], np.int64)
        mask = np.zeros((len(texts), L), np.int64)
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False) if texts else []
        name, arg = self.policy
        for r, (text, enc) in enumerate(zip(texts, encs)):
            if not text:
                continue
            x = list(enc.ids)
            if len(x) > budget and name == "head-tail":
                h = min(budget, budget // 2 if arg is None else arg)
                x = x[:h] + x[len(x) - (budget - h):]
            row = pre + x[:budget] + post
            ids[r, :len(row)], mask[r, :len(row)] = row, 1
        return ids, mask

    def load_images(self, posts) -> tuple[list[list[np.ndarray]], list[list]]:
        """Each post's usable images, preprocessed ``(3, S, S)``, and its image rejects."""
        from sgmft.errors import ImageLoadError
        from sgmft.ingest.images import load_any

        im, first = self.meta["image"], self.meta["image_choice"] == "first"
        per_post, rejects = [], []
        for p in posts:
            ok, rej = [], []
            for j, src in enumerate(list(p.images)[:im["max_images"]]):
                try:
                    ok.append(self._tf.cn_clip_pixels(load_any(src, reduce_to=im["reduce_to"]), im["side"]))
                except ImageLoadError as e:
                    rej.append([j, e.reason])
                    continue
                if first:
                    break
            per_post.append(ok)
            rejects.append(rej)
        return per_post, rejects

    # -- prediction -----------------------------------------------------------------------------
    def predict(self, posts) -> list[dict]:
        """``sgmft.ingest.manifest.Post``-like objects (``id``, ``text``, ``images``) -> one dict each.

        Posts are run in groups with the same number of usable images, so that no image slot is
        padding (a post without images still takes one empty slot)."""
        texts = [self.cleaner.clean(p.text) for p in posts]
        ids, mask = self.token_arrays(texts)
        imgs, rejects = self.load_images(posts)
        S = self.meta["image"]["side"]
        probs = np.zeros((len(posts), len(self.labels)), np.float32)
        groups: dict[int, list[int]] = {}
        for r, ok in enumerate(imgs):
            groups.setdefault(max(1, len(ok)), []).append(r)
        for m, rows in sorted(groups.items()):
            pix = np.zeros((len(rows), m, 3, S, S), np.float32)
            valid = np.zeros((len(rows), m), bool)
            for i, r in enumerate(rows):
                for j, x in enumerate(imgs[r]):
                    pix[i, j], valid[i, j] = x, True
            feed = {"input_ids": ids[rows], "attention_mask": mask[rows], "pixel_values": pix,
                    "image_valid": valid, "text_mask": np.array([bool(texts[r]) for r in rows])}
            probs[rows] = self.session.run(["probs"], feed)[0]
        out = []
        for p, pr, rej in zip(posts, probs, rejects):
            k = int(np.argmax(pr))
            out.append({"id": p.id, "label": self.labels[k], "confidence": float(pr[k]),
                        "probs": {n: float(v) for n, v in zip(self.labels, pr)}, "image_rejects": rej})
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sgmft.runner.onnx_runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir", help="folder written by `sgmft export RUN --with-backbone --format onnx`")
    ap.add_argument("manifest", help="posts manifest (JSONL/CSV, docs/posts-manifest.md)")
    ap.add_argument("--out", help="predictions JSONL (default: stdout)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, help="onnxruntime threads (default: its own choice)")
    args = ap.parse_args(argv)
    from sgmft.ingest.manifest import read_manifest

    runner = OnnxPostRunner(args.export_dir, threads=args.threads)
    posts, rejects = read_manifest(args.manifest, label_names=None, on_error="skip")
    for r in rejects:
        print(f"line {r.line} [{r.id or '-'}] {r.field}: {r.reason}", file=sys.stderr)
    lines = []
    for s in range(0, len(posts), args.batch_size):
        lines += [json.dumps(x, ensure_ascii=False) for x in runner.predict(posts[s:s + args.batch_size])]
    text = "\n".join(lines) + ("\n" if lines else "")
    if args.out:
        from sgmft import atomic

        atomic.write_text(args.out, text)
    else:
        sys.stdout.write(text)
    print(f"predicted {len(posts)} post(s); {len(rejects)} manifest reject(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
