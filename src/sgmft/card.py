"""The model card: ``README.md`` in a checkpoint folder, as on the Hugging Face Hub.

YAML front matter (``library_name: sgmft``, tags, a ``model-index`` with the recorded
metrics), then Labels, Data, Preset and configuration, Metrics, Feature contract, How to use,
Intended use and Limits, built from the checkpoint's JSON files and, when the folder is a
run's ``model/``, from the run folder (``run.json``, ``eval-*/metrics.json``). Training
writes it; ``evaluate`` rewrites it after a report inside the run; ``save_pretrained``
(:mod:`sgmft.predict.pretrained`) copies it. Part of the run-folder layer: no Lightning.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sgmft.runs import RunDir

__all__ = ["CARD", "model_card", "write_model_card"]

CARD = "README.md"


def _run_facts(run: RunDir | None) -> tuple[dict, list[dict]]:
    """``(run.json, [evaluation metrics with their split and store])`` of a run folder (empty
    without one). Each evaluation gets ``store_name``: the evaluated store's folder name, marked
    as the training store when its post ids are the training store's."""
    if run is None:
        return {}, []
    runj = run.read_run_json() or {}
    evals = []
    for m in run.evaluations():
        store = m.get("store")
        same = bool(m.get("store_ids")) and m.get("store_ids") == runj.get("store_ids")
        name = Path(store).name if store else "unknown store (evaluated by an older sgmft)"
        evals.append({**m, "store_name": name, "training_store": same})
    return runj, evals


def _fmt(v, pct: bool = True) -> str:
    return "–" if v is None else (f"{100 * v:.2f} %" if pct else str(v))


_TASK = {"type": "multimodal-classification", "name": "semantic location prediction"}


def _model_index(evals: list[dict], runj: dict, store_name: str) -> list[dict]:
    """The ``model-index`` results of the front matter: one per evaluation, each naming its
    store; else the best validation accuracy on the training store."""
    results = []
    for m in evals:
        metrics = [{"type": "accuracy", "value": round(float(m["accuracy"]), 6), "name": "accuracy"}]
        if m.get("macro_f1") is not None:
            metrics.append({"type": "f1", "value": round(float(m["macro_f1"]), 6), "name": "macro-F1",
                            "args": {"average": "macro"}})
        results.append({"task": dict(_TASK), "metrics": metrics,
                        "dataset": {"name": m["store_name"], "type": "sgmft-feature-store", "split": m["split"]}})
    if not results and runj.get("best_val_acc") is not None:
        cv = bool((runj.get("selection") or {}).get("final"))       # a fold committee: cross-validated figure
        results.append({"task": dict(_TASK),
                        "dataset": {"name": store_name, "type": "sgmft-feature-store",
                                    "split": "cross-validation" if cv else "validation"},
                        "metrics": [{"type": "accuracy", "value": round(float(runj["best_val_acc"]), 6),
                                     "name": "cross-validated accuracy of the chosen candidate" if cv
                                     else "best validation accuracy"}]})
    return results


def _model_items(cfg) -> list[tuple[str, object]]:
    """The model's view (sgmft.models.registry.model_view), options of ``extra`` listed by name."""
    from sgmft.models.registry import model_view

    view = model_view(cfg)
    return sorted([(k, v) for k, v in view.items() if k != "extra"] + list((view.get("extra") or {}).items()))


def _inputs_line(cfg) -> str:
    """How the model treats its inputs: its input normalisation, or an ensemble's members (eqs E1, E1')."""
    if cfg.arch == "ensemble":              # the members' full configs are in config.json
        ex = cfg.extra
        pool = ("the logarithmic pool of their calibrated probabilities, eq E1'" if ex.get("pool") == "log_mean"
                else "the mean of their calibrated probabilities, eq E1")
        return (f"* members ({pool}; each keeps its own input normalisation and calibration): " + ", ".join(
                    f"`{n}` (arch `{m.get('arch')}`, input_norm `{m.get('input_norm', 'none')}`, temperature "
                    f"{c.get('temperature', 1.0):.3g}, uniform weight {c.get('uniform_weight', 0.0):.3g})"
                    for n, m, c in zip(ex["names"], ex["members"], ex["calibrations"])))
    norm = getattr(cfg, "input_norm", "none")
    return "* input normalisation: " + ("none (raw features)" if norm == "none" else
                                        f"`{norm}`, fitted on the training split only and stored in the weights "
                                        "(buffers), so predict, serve and export apply it")


def _training_line(runj: dict) -> str:
    """How the model was made: epochs, a fold committee of cross-validation, or no gradient steps."""
    final = (runj.get("selection") or {}).get("final")
    if final:
        what = ("one model refitted after cross-validation" if len(final["members"]) == 1 else
                f"a committee of {len(final['members'])} models from the cross-validation")
        return f"* {what} (see below); the selection took {runj.get('seconds')} s"
    if runj.get("epochs_run") is not None:
        return f"* epochs run: {runj.get('epochs_run')}, training time {runj.get('seconds')} s"
    return f"* not trained by gradient steps: assembled or fitted in {runj.get('seconds')} s"


def _committee_line(final: dict, posts: int) -> str:
    """What a small store's model is (train/select.py ``_write_committee``): an LDA refitted on every pooled
    post, or the weighted mean of the chosen candidate's fold models, each calibrated out of fold."""
    cals = "; ".join(f"`{n}` T = {c.get('temperature', 1.0):.3g}, uniform weight {c.get('uniform_weight', 0.0):.3g}"
                     for n, c in final["member_calibration"].items())
    if len(final["members"]) == 1:
        cal, grown = final.get("calibration") or {}, ""
        size = cal.get("temperature_by_training_posts")          # eq E3: {n_2: T, n_5: T, N: T}, in that order
        if size:
            n2, n5, n = size
            grown = (f"; its temperature scaled to the refit's size (eq E3) by T({n}) / T({n5}) = {size[n]:.3g} / "
                     f"{size[n5]:.3g}, plain temperatures fitted at {n2} and {n5} training posts (T = {size[n2]:.3g}, "
                     f"{size[n5]:.3g}) and extrapolated to {n}: T = {cal.get('temperature', 1.0):.3g}")
        return (f"* the model is `{final['of']}` refitted on all {posts} training and validation posts, "
                f"calibrated on its out-of-fold predictions ({cals}){grown}")
    refit = [m for m in final["members"] if m.endswith("@all")]
    weights = final.get("weights") or []
    parts = final.get("partitions", 1)
    by = (final.get("calibration") or {}).get("temperature_by_members")
    outer = ("one temperature for the committee, fitted on the same posts" if not by else
             "one temperature for the committee, T = " + f"{by[max(by, key=int)]:.3g}: fitted to committees of "
             + " and ".join(k for k in sorted(by, key=int)[:-1]) + " fold models that never saw the post "
             f"(T = {', '.join(f'{by[k]:.3g}' for k in sorted(by, key=int)[:-1])}) and extrapolated to "
             f"{max(by, key=int)} (eq E2)")
    return (f"* the model is the fold committee of `{final['of']}`: the mean of the calibrated probabilities of "
            f"{len(final['members'])} models, the cross-validation fold models (each trained on four fifths of "
            f"the {posts} training and validation posts"
            + (f"; {parts} partitions of them into folds" if parts > 1 else "") + ")"
            + (f" and {', '.join(f'`{m}`' for m in refit)} (refitted on all of them)" if refit else "")
            + (f", weights {weights}" if len(set(weights)) > 1 else "")
            + f"; each calibrated on the out-of-fold predictions of its candidate ({cals}), then {outer}")


def _data_and_config(info: dict, runj: dict, store_name: str, backbone: str, preset: str) -> list[str]:
    """The Data and "Preset and configuration" sections."""
    cfg, feats, train = info["model_cfg"], info.get("features") or {}, info.get("train") or {}
    L = ["## Data", ""]
    if runj:
        L += [f"* training store: `{store_name}` (backbone `{backbone}`, D = {feats.get('dim')})",
              f"* posts: {runj.get('num_train')} train, {runj.get('num_val')} validation, "
              f"{runj.get('num_test')} test (split saved in the run folder)",
              _training_line(runj)]
    else:
        L.append(f"* features from backbone `{backbone}`, D = {feats.get('dim')}; the training run folder "
                 "was not available when this card was written")
    if backbone == "simfeat":
        L.append("* **synthetic data**: SimFeat, sgmft's simulated feature benchmark. The model has no "
                 "meaning for real posts.")
    fusion = getattr(cfg, "fusion", None) if cfg.arch == "sgmft" else None
    L += ["", "## Preset and configuration", "",
          f"* preset `{preset}`, architecture `{cfg.arch}`" + (f", fusion `{fusion}`" if fusion else ""),
          "* model (what the architecture reads, options resolved): "
          + ", ".join(f"{k} = {v}" for k, v in _model_items(cfg)
                      if cfg.arch != "ensemble" or k not in ("members", "calibrations"))]   # next line
    L.append(_inputs_line(cfg))
    sel = runj.get("selection") or {}
    if sel.get("chosen"):                   # a selecting preset (auto): what was chosen and why
        cv = sel.get("cross_validation")
        cands = sel.get("candidates") or {}
        accs = (cv["accuracy"] if cv else {n: c.get("val_acc") for n, c in cands.items() if "skipped" not in c})
        how = (f"{cv['folds']}-fold cross-validated accuracy on {cv['posts']} training and validation posts"
               if cv else "validation accuracy")
        L.append(f"* chosen by preset `{runj.get('preset')}`: `{sel['chosen']}` (rule: {sel.get('rule')}; {how} "
                 + ", ".join(f"`{n}` {_fmt(a)}" for n, a in accs.items()) + ")")
        if cv and sel.get("final"):
            L.append(_committee_line(sel["final"], cv["posts"]))
        L += [f"* not trained: `{n}`, {c['skipped']}" + (f" ({c['sized']['reason']})" if c.get("sized") else "")
              for n, c in cands.items() if "skipped" in c]
    if train:
        keys = ("epochs", "batch_size", "lr", "weight_decay", "seed", "split", "precision")
        L.append("* training: " + ", ".join(f"{k} = {train[k]}" for k in keys if k in train))
    return L


def _metrics(evals: list[dict], runj: dict, store_name: str) -> list[str]:
    """The Metrics table: every row names the store its figure was measured on."""
    L = ["## Metrics", ""]
    if not evals and runj.get("best_val_acc") is None:
        return L + ["No figures recorded (the run folder was not available, or the model was not evaluated)."]
    L += ["| store | split | posts | accuracy | macro-F1 | accuracy / oracle |", "|---|---|---|---|---|---|"]
    if runj.get("best_val_acc") is not None:
        cv = (runj.get("selection") or {}).get("cross_validation") if (runj.get("selection") or {}).get("final") \
            else None
        what, n = (("cross-validation of the chosen candidate (out-of-fold, model selection)", cv["posts"]) if cv
                   else ("validation (best epoch, model selection)", runj.get("num_val")))
        L.append(f"| `{store_name}` (training store) | {what} | {n} | {_fmt(runj['best_val_acc'])} | – | – |")
    for m in evals:
        where = f"`{m['store_name']}`" + (" (training store)" if m["training_store"] else "")
        ratio = m.get("accuracy_over_oracle")
        L.append(f"| {where} | {m['split']} (`sgmft evaluate`) | {m.get('num_samples', '–')} | "
                 f"{_fmt(m['accuracy'])} | {_fmt(m.get('macro_f1'))} | "
                 f"{'–' if ratio is None else format(ratio, '.3f')} |")
    return L


def _contract_and_usage(feats: dict, backbone: str) -> list[str]:
    """The Feature contract and How to use sections."""
    extraction = feats.get("extraction")
    L = ["## Feature contract", "",
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
    return L + ["```"]


def _use_and_limits(n_labels: int) -> list[str]:
    return ["## Intended use", "",
            "Research and aggregate analysis of semantic location (home, work, school, ...) in social-media "
            "posts, on features made with the backbone above; a reference for comparing fusion models "
            "(SG-MFT, arXiv 2405.05760).", "",
            "## Limits", "",
            "* Only valid on features from the same backbone, precision, text cleaning and image choice "
            "(the feature contract); `sgmft predict` refuses a different D or backbone fingerprint.",
            f"* The place set is fixed to the {n_labels} labels above; every post gets one of them, "
            "including posts from none of these places.",
            "* Accuracy holds for data like the evaluated store; other platforms, languages, years or user "
            "groups may differ. Each figure above is on the store named in its row.",
            "* Inferring where a person is can be sensitive: do not use it to track or identify individuals, "
            "and follow the platform's terms and the applicable privacy law.",
            ""]


def model_card(info: dict, run: RunDir | None = None, *, name: str | None = None) -> str:
    """The README.md model card of a checkpoint (``info`` as returned by ``load_checkpoint``),
    with the data, validation and evaluation figures of its run folder when there is one."""
    cfg, labels = info["model_cfg"], list(info["label_names"])
    feats = info.get("features") or {}
    preset = info.get("preset") or "custom"
    runj, evals = _run_facts(run)
    store_name = Path(runj["store"]).name if runj.get("store") else "unknown"
    backbone = feats.get("backbone") or "unknown"
    name = name or (f"sgmft-{preset}-{store_name}" if preset != "sgmft" else f"sgmft-{store_name}")
    tags = ["sgmft", "sg-mft", "multimodal", "semantic-location-prediction", "social-media", cfg.arch,
            *(["synthetic-data"] if backbone == "simfeat" else [])]
    front = {"library_name": "sgmft", "tags": list(dict.fromkeys(tags)), "model_name": name}
    results = _model_index(evals, runj, store_name)
    if results:
        front["model-index"] = [{"name": name, "results": results}]
    L = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
         f"# {name}", "",
         f"{'An' if cfg.arch[:1] in 'aeiou' else 'A'} `{cfg.arch}` model (preset `{preset}`) of the [sgmft](https://arxiv.org/abs/2405.05760) toolkit: "
         f"it predicts where the author of a social-media post is, one of {len(labels)} places, from the "
         "post's text and image features. This card was written by sgmft from the checkpoint and its run "
         "folder.", "",
         "## Labels", "",
         "Index order of the model's outputs: " + ", ".join(f"{i} `{n}`" for i, n in enumerate(labels)) + ".", ""]
    L += _data_and_config(info, runj, store_name, backbone, preset) + [""]
    L += _metrics(evals, runj, store_name) + [""]
    L += _contract_and_usage(feats, backbone) + [""]
    return "\n".join(L + _use_and_limits(len(labels)))


def write_model_card(model_dir, *, name: str | None = None) -> Path:
    """(Re)write ``README.md`` in a checkpoint folder from its JSON files and its run folder
    (training calls this, and ``evaluate`` after writing a report inside the run). Atomic."""
    from sgmft.atomic import write_text
    from sgmft.checkpoint import read_checkpoint

    info = read_checkpoint(model_dir)          # the checked, migrated contract (no weights read)
    return write_text(info["path"] / CARD, model_card(info, info["run"], name=name))
