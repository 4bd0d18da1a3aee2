"""The model card: ``README.md`` in a checkpoint folder, as on the Hugging Face Hub.

YAML front matter (``library_name: sgmft``, tags, a ``model-index`` with the recorded
metrics), then Labels, Data, Preset and configuration, Metrics, Feature contract, How to use,
Intended use and Limits, built from the checkpoint's JSON files and, when the folder is a
run's ``model/``, from the run folder (``run.json``, ``eval-*/metrics.json``). Training
writes it; ``evaluate`` rewrites it after a report inside the run; ``save_pretrained``
(:mod:`sgmft.predict.pretrained`) copies it. Part of the run-folder layer: no Lightning.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from sgmft.runs import RunDir, locate

__all__ = ["CARD", "model_card", "write_model_card"]

CARD = "README.md"


def _run_facts(run: RunDir | None) -> tuple[dict, list[dict]]:
    """``(run.json, [evaluation metrics with their split])`` of a run folder (empty without one)."""
    if run is None:
        return {}, []
    evals = []
    for d in sorted(run.root.glob("eval-*")):
        try:
            m = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(m, dict) and "accuracy" in m:
            evals.append({"split": d.name.removeprefix("eval-"), **m})
    return run.read_run_json() or {}, evals


def _fmt(v, pct: bool = True) -> str:
    return "–" if v is None else (f"{100 * v:.2f} %" if pct else str(v))


def model_card(info: dict, run: RunDir | None = None, *, name: str | None = None) -> str:
    """The README.md model card of a checkpoint (``info`` as returned by ``load_checkpoint``),
    with the data, validation and evaluation figures of its run folder when there is one."""
    cfg = info["model_cfg"]
    labels = list(info["label_names"])
    feats = info.get("features") or {}
    extraction = feats.get("extraction")
    train = info.get("train") or {}
    preset = info.get("preset") or "custom"
    runj, evals = _run_facts(run)
    store = runj.get("store")
    store_name = Path(store).name if store else "unknown"
    backbone = feats.get("backbone") or "unknown"
    name = name or (f"sgmft-{preset}-{store_name}" if preset != "sgmft" else f"sgmft-{store_name}")
    synthetic = backbone == "simfeat"

    results = []
    for m in evals:
        metrics = [{"type": "accuracy", "value": round(float(m["accuracy"]), 6), "name": "accuracy"}]
        if m.get("macro_f1") is not None:
            metrics.append({"type": "f1", "value": round(float(m["macro_f1"]), 6), "name": "macro-F1",
                            "args": {"average": "macro"}})
        results.append({"task": {"type": "multimodal-classification", "name": "semantic location prediction"},
                        "dataset": {"name": store_name, "type": "sgmft-feature-store", "split": m["split"]},
                        "metrics": metrics})
    if not results and runj.get("best_val_acc") is not None:
        results.append({"task": {"type": "multimodal-classification", "name": "semantic location prediction"},
                        "dataset": {"name": store_name, "type": "sgmft-feature-store", "split": "validation"},
                        "metrics": [{"type": "accuracy", "name": "best validation accuracy",
                                     "value": round(float(runj["best_val_acc"]), 6)}]})
    front = {"library_name": "sgmft",
             "tags": list(dict.fromkeys(["sgmft", "sg-mft", "multimodal", "semantic-location-prediction",
                                         "social-media", cfg.arch, *(["synthetic-data"] if synthetic else [])])),
             "model_name": name}
    if results:
        front["model-index"] = [{"name": name, "results": results}]

    L = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
         f"# {name}", "",
         f"A `{cfg.arch}` model (preset `{preset}`) of the [sgmft](https://arxiv.org/abs/2405.05760) toolkit: "
         f"it predicts where the author of a social-media post is, one of {len(labels)} places, from the "
         "post's text and image features. This card was written by sgmft from the checkpoint and its run "
         "folder.", "",
         "## Labels", "",
         "Index order of the model's outputs: " + ", ".join(f"{i} `{n}`" for i, n in enumerate(labels)) + ".", "",
         "## Data", ""]
    if runj:
        L += [f"* training store: `{store_name}` (backbone `{backbone}`, D = {feats.get('dim')})",
              f"* posts: {runj.get('num_train')} train, {runj.get('num_val')} validation, "
              f"{runj.get('num_test')} test (split saved in the run folder)",
              f"* epochs run: {runj.get('epochs_run')}, training time {runj.get('seconds')} s"]
    else:
        L.append(f"* features from backbone `{backbone}`, D = {feats.get('dim')}; the training run folder "
                 "was not available when this card was written")
    if synthetic:
        L.append("* **synthetic data**: SimFeat, sgmft's simulated feature benchmark. The model has no "
                 "meaning for real posts.")
    L += ["", "## Preset and configuration", "",
          f"* preset `{preset}`, architecture `{cfg.arch}`, fusion `{cfg.fusion}`",
          "* model: " + ", ".join(f"{k} = {v}" for k, v in sorted(dataclasses.asdict(cfg).items())),
          ]
    if train:
        keys = ("epochs", "batch_size", "lr", "weight_decay", "seed", "split", "precision")
        L.append("* training: " + ", ".join(f"{k} = {train[k]}" for k in keys if k in train))
    L += ["", "## Metrics", ""]
    if evals or runj.get("best_val_acc") is not None:
        L += ["| split | posts | accuracy | macro-F1 | accuracy / oracle |", "|---|---|---|---|---|"]
        if runj.get("best_val_acc") is not None:
            L.append(f"| validation (best epoch, model selection) | {runj.get('num_val')} | "
                     f"{_fmt(runj['best_val_acc'])} | – | – |")
        for m in evals:
            L.append(f"| {m['split']} (`sgmft evaluate`) | {m.get('num_samples', '–')} | {_fmt(m['accuracy'])} | "
                     f"{_fmt(m.get('macro_f1'))} | "
                     f"{'–' if m.get('accuracy_over_oracle') is None else format(m['accuracy_over_oracle'], '.3f')} |")
    else:
        L.append("No figures recorded (the run folder was not available, or the model was not evaluated).")
    L += ["", "## Feature contract", "",
          "The model's inputs must be made exactly like its training features (`features.json`):", "",
          f"* backbone `{backbone}`, D = {feats.get('dim')}, normalisation `{feats.get('normalization')}`"]
    if extraction:
        cc = extraction.get("clean_config")
        L += [f"* backbone fingerprint `{extraction.get('backbone_fingerprint')}`, precision "
              f"`{extraction.get('backbone_precision')}`",
              f"* image choice `{extraction.get('image_choice')}`, text-cleaning fingerprint "
              f"`{extraction.get('clean_fingerprint')}`",
              "* text cleaning: " + (json.dumps(cc, ensure_ascii=False, sort_keys=True) if cc else "default")]
    elif "extraction" in feats:
        L.append("* features not made by `sgmft extract` (SimFeat or the user's own): raw posts cannot be "
                 "encoded for this model; predict feature stores")
    L += ["", "## How to use", "", "```python", "from sgmft.predict import Predictor", "",
          "pred = Predictor.from_pretrained(\"PATH_OR_HUB_ID\")   # a folder, or owner/name on the hub",
          "p = pred.predict_store(\"features/new\")          # or pred.predict_features(text, image)",
          "print([p.label_names[i] for i in p.top])", "```", "", "```sh",
          "sgmft predict PATH --store features/new --out preds.csv"]
    if extraction:
        L.append('sgmft predict PATH --text "..." --image photo.jpg     # raw posts, same backbone')
    L += ["```", "",
          "## Intended use", "",
          "Research and aggregate analysis of semantic location (home, work, school, ...) in social-media "
          "posts, on features made with the backbone above; a reference for comparing fusion models "
          "(SG-MFT, arXiv 2405.05760).", "",
          "## Limits", "",
          "* Only valid on features from the same backbone, precision, text cleaning and image choice "
          "(the feature contract); `sgmft predict` refuses a different D or backbone fingerprint.",
          f"* The place set is fixed to the {len(labels)} labels above; every post gets one of them, "
          "including posts from none of these places.",
          "* Accuracy holds for data like the training store; other platforms, languages, years or user "
          "groups may differ. The figures above are on the store named in Data.",
          "* Inferring where a person is can be sensitive: do not use it to track or identify individuals, "
          "and follow the platform's terms and the applicable privacy law.",
          ""]
    return "\n".join(L)


def write_model_card(model_dir, *, name: str | None = None) -> Path:
    """(Re)write ``README.md`` in a checkpoint folder from its JSON files and its run folder
    (training calls this, and ``evaluate`` after writing a report inside the run). Atomic."""
    from sgmft.atomic import write_text
    from sgmft.config import model_config_from_dict

    p, run = locate(model_dir)
    cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    info = {"model_cfg": model_config_from_dict(cfg["model"], f"{p / 'config.json'}: model"),
            "label_names": json.loads((p / "labels.json").read_text(encoding="utf-8")),
            "features": json.loads((p / "features.json").read_text(encoding="utf-8")),
            "preset": cfg.get("preset", ""), "train": cfg.get("train")}
    return write_text(p / CARD, model_card(info, run, name=name))
