"""Zero-shot place prediction with Chinese-CLIP: no labels, no training (``sgmft zero-shot``).

Every place gets Chinese prompts: each template (``"我在{}"``, ``"一张{}的照片"``, ...) filled with
each of its names (``健身房``, ``体育馆``). The text tower encodes them; their L2-normalised
embeddings are averaged and re-normalised (CLIP's prompt ensembling) into one class embedding
per place. The ``zeroshot`` head (:mod:`sgmft.models.zeroshot`) scores a post by CLIP's scaled
cosine of its text and of its image with every class embedding, averaged with ``text_weight``.

:func:`build_zero_shot` writes an ordinary run folder (``model/`` + ``run.json``), whose feature
contract names the backbone, its fingerprint, the text cleaning and the image choice, so
``sgmft predict``, ``serve``, ``evaluate`` and ``export`` take it like a trained run.

Its accuracy depends entirely on real Chinese-CLIP weights: the tests run the mechanics on a
tiny RANDOM model, whose predictions mean nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from sgmft import atomic
from sgmft.errors import InputError
from sgmft.labels import DEFAULT_LABELS

__all__ = ["DEFAULT_NAMES", "DEFAULT_TEMPLATES", "PromptSet", "build_zero_shot", "class_embeddings", "load_prompts"]

# Chinese templates (a post is first person and informal; the photo templates suit the image side)
DEFAULT_TEMPLATES = ("{}", "在{}", "我在{}", "今天在{}", "刚到{}", "一张{}的照片", "这是在{}拍的照片", "{}里")
DEFAULT_NAMES = {
    "home": ["家", "家里", "我家"],
    "work": ["公司", "办公室", "单位"],
    "school": ["学校", "教室", "校园"],
    "restaurant": ["餐厅", "饭店", "餐馆"],
    "cinema": ["电影院", "影院", "影城"],
    "gym": ["健身房", "体育馆", "健身中心"],
    "shopping": ["商场", "购物中心", "超市"],
    "travel": ["景区", "旅游景点", "旅途中"],
}


@dataclass
class PromptSet:
    """Templates (each with one ``{}``) and, per place, the names filled into them."""

    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    names: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_NAMES.items()})

    def prompts(self, label: str) -> list[str]:
        return [t.replace("{}", n) for n in self.names[label] for t in self.templates]

    def check(self, labels: Sequence[str], where: str = "prompts") -> "PromptSet":
        if not self.templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in self.templates):
            raise InputError(f"{where}: 'templates' must be a non-empty list of strings, each with exactly one {{}}")
        missing = [lab for lab in labels if not self.names.get(lab)]
        if missing:
            raise InputError(f"{where}: no names for place(s) {missing}; give them under 'labels' "
                             f"(e.g. {{\"{missing[0]}\": [\"...\"]}})")
        bad = [lab for lab in labels if not all(isinstance(n, str) and n.strip() for n in self.names[lab])]
        if bad:
            raise InputError(f"{where}: 'labels' of {bad} must be lists of non-empty strings")
        return self


def load_prompts(path: str | Path | None, labels: Sequence[str] = DEFAULT_LABELS) -> PromptSet:
    """The default prompts, or a JSON file ``{"templates": [...], "labels": {"place": [names]}}``
    (either key may be left out: the defaults fill in; ``labels`` may name other places)."""
    ps = PromptSet()
    if path is None:
        return ps.check(labels)
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read the prompts JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or set(d) - {"templates", "labels"}:
        raise InputError(f"{p}: must be an object with 'templates' and/or 'labels'")
    if "templates" in d:
        ps.templates = d["templates"] if isinstance(d["templates"], list) else []
    if "labels" in d:
        if not isinstance(d["labels"], dict):
            raise InputError(f"{p}: 'labels' must map each place to a list of names")
        ps.names.update({k: (v if isinstance(v, list) else [v]) for k, v in d["labels"].items()})
    return ps.check(labels, str(p))


def class_embeddings(bb, prompts: PromptSet, labels: Sequence[str]) -> np.ndarray:
    """``(K, D)`` float32: per place, the normalised mean of its prompts' normalised text embeddings."""
    out = []
    for lab in labels:
        e = bb.encode_text(prompts.prompts(lab)).astype(np.float64)
        m = e.mean(0)
        out.append(m / max(np.linalg.norm(m), 1e-12))
    return np.stack(out).astype(np.float32)


def clip_logit_scale(bb, default: float = 100.0) -> float:
    """CLIP's learned temperature ``exp(logit_scale)`` (capped at 100 as in training), if the backbone has one."""
    ls = getattr(getattr(bb, "model", None), "logit_scale", None)
    return default if ls is None else float(min(float(ls.detach().float().exp()), 100.0))


def _extraction(bb, clean_cfg, image_choice: str) -> dict:
    """The feature contract's ``extraction`` entry, as ``sgmft extract`` writes it."""
    from sgmft.ingest.text import TextCleaner

    cleaner = TextCleaner(clean_cfg)
    return {"backbone_fingerprint": bb.fingerprint(), "backbone_precision": bb.precision,
            "clean_config": asdict(cleaner.cfg), "clean_fingerprint": cleaner.fingerprint(),
            "image_choice": image_choice}


def build_zero_shot(backbone, out: str | Path, *, labels: Sequence[str] = DEFAULT_LABELS,
                    prompts: PromptSet | str | Path | None = None, text_weight: float = 0.5,
                    clean_cfg=None, image_choice: str = "similar", overwrite: bool = False,
                    device: str = "auto", dtype: str = "auto") -> dict:
    """Write a zero-shot run folder at ``out`` for ``backbone`` (a spec or a loaded Backbone)."""
    import torch

    from sgmft.checkpoint import FeatureContract, write_model_folder
    from sgmft.config import ModelConfig
    from sgmft.features.backbones import load_backbone
    from sgmft.features.encode import check_image_choice
    from sgmft.models import build_model
    from sgmft.runs import RunDir

    check_image_choice(image_choice)
    labels = list(labels)
    ps = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts, labels)
    ps.check(labels)
    run = RunDir(Path(out))
    if run.root.exists() and any(run.root.iterdir()) and not overwrite:
        raise FileExistsError(f"{run.root} exists and is not empty; pass --overwrite to replace its run files")
    bb = load_backbone(backbone, device=device, dtype=dtype) if isinstance(backbone, str) else backbone
    W = class_embeddings(bb, ps, labels)
    scale = clip_logit_scale(bb)
    # logits = the combined cosine score (order 1); CLIP's temperature is the calibration record, so
    # predict/serve/evaluate/export give softmax(scale * score), CLIP's zero-shot probabilities
    cfg = ModelConfig(arch="zeroshot", dim=int(bb.dim), num_classes=len(labels),
                      extra={"text_weight": float(text_weight), "logit_scale": 1.0})
    # (build_model checks what the zero-shot head reads; ModelConfig.validate would also demand
    # SG-MFT's n_tokens | dim, which this head does not read)
    calibration = {"method": "temperature", "temperature": 1.0 / scale,
                   "source": "CLIP logit_scale of the backbone (zero-shot; not fitted on data)"}
    model = build_model(cfg)
    with torch.no_grad():
        model.class_emb.copy_(torch.from_numpy(W))
    contract = FeatureContract(bb.spec, int(bb.dim), "l2", _extraction(bb, clean_cfg, image_choice))
    used = {"templates": ps.templates, "labels": {lab: ps.names[lab] for lab in labels}}
    card = ("# Zero-shot run (sgmft zero-shot)\n\nNo training and no labels: CLIP's scaled cosine between the "
            f"post and prompt embeddings of each place ({len(ps.templates)} templates; prompts.json), text weight "
            f"{text_weight}, logit scale {scale:.2f}, backbone `{bb.spec}`. Its accuracy depends on real "
            "Chinese-CLIP weights; measure it with `sgmft evaluate` on labelled posts before relying on it.\n")
    run.root.mkdir(parents=True, exist_ok=True)
    write_model_folder(run.model, model, cfg, labels, contract, None, "zeroshot",
                       extra_files={"prompts.json": json.dumps(used, ensure_ascii=False, indent=2) + "\n",
                                    "README.md": card}, calibration=calibration)
    summary = {"kind": "zero-shot", "preset": "zeroshot", "backbone": bb.spec, "dim": int(bb.dim),
               "labels": labels, "text_weight": float(text_weight), "logit_scale": scale,
               "num_prompts": {lab: len(ps.prompts(lab)) for lab in labels}, "image_choice": image_choice,
               "store": None, "model": str(run.model)}
    atomic.write_text(run.run_json, json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    return summary
