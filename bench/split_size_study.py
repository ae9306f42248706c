"""TECH_REPORT.md section 4.5, the split-size table and its figure (error and hold-out cost by split size).

How large must the validation split be for a mean absolute error <= 3 points against the dev-test
top-1, and what does that size cost? Many splits, cheap, offline: a diagnosis.

Trained models take ~40 min each on the proxy, so four splits were all the recipe could be measured on
(TECH_REPORT.md section 4.5). Frozen-feature models take seconds: for every split seed s and images per class k,

  - the product's split (app.validation.choose_split, seed s, per_class k, the default max_class_share,
    no max_fraction cap) is held out with every byte copy of its images;
  - the product's head warmup (app.warmup.train_head: the warmup config, the noise stage's weights, the
    class prior of what is left) is fitted on the rest: the model;
  - its estimate (app.validation.estimate_with_size, with and without the noise stage's control variate) is
    compared with its top-1 on the dev-test photos (balanced logits, as run_infer.sh);
  - the same probe fitted on every image (seed s) gives the hold-out cost of k for this model.

Per k: the estimate's mean error (its bias for this model), its spread over splits (the draw's
luck), its MAE against the dev-test top-1, the share of splits within 3 points, the MAE expected from
the split's sampling alone (the product's own effective size), the variance the control variate
leaves, and the hold-out cost. With --truth (diagnosis only), the error in estimate_gap's two parts:
`labels` (the estimate minus the probe's top-1 on the split's own photos against their TRUE labels:
what the clean-score weighting misses) and `shift` (that minus the dev-test top-1: the held-out
train photos against the test photos). The dev-test labels and the truth file are only compared
against: nothing is fitted on them. A frozen probe sees the images through the same features as the
noise stage that scores them, so its errors fall where the clean scores are low: its bias is a worst
case for the weighting, and the variance the control variate (itself an out-of-fold frozen probe)
leaves is a lower bound for fine-tuned models (the recipe's: 0.44-0.82, TECH_REPORT.md section 4.5).

    python bench/split_size_study.py --run AUDIT_OUT --data ../shared/data/flowers102-noisy \
        --weights ../shared/models/proxy-vit-s8-64.pt --config configs/proxy-cpu.yaml \
        --truth ../shared/data/flowers102-noisy/train_truth.csv \
        --per-class 1 2 3 5 --splits 100 --out bench/results/split_size/flowers.json

AUDIT_OUT: `python -m app audit` (or a training run) of DATA/train with the same backbone and config:
work/scan.csv, work/noise.csv and its features cache.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.config import load_config  # noqa: E402
from app.model import log_class_prior  # noqa: E402
from app.report import write_json  # noqa: E402
from app.studies.make_noisy import read_truth  # noqa: E402
from app.validation import (choose_split, class_mean_scores, estimate_with_size, noisy_split_top1,  # noqa: E402
                            probe_covariate, split_table)
from app.warmup import train_head  # noqa: E402
from bench.estimate_gap import decompose  # noqa: E402

Z_MAE = math.sqrt(2 / math.pi)          # E|N(0, sd)| = sd x sqrt(2 / pi)


def load_audit(run: Path) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """(images: work/scan.csv's rows the feature pass decoded, with work/noise.csv's columns beside
    them, row for row; their frozen features from the run's cache, float32; the class list). The
    files that could not be decoded are in scan.csv but have no noise score: they are left out here
    as training leaves them out."""
    images = pd.read_csv(run / "work" / "scan.csv", dtype={"path": str, "hash": str})
    (cache,) = (run / "cache").glob("features-*")
    index = pd.read_csv(cache / "index.csv", dtype={"hash": str})
    row = images["hash"].map(dict(zip(index["hash"], range(len(index))))).to_numpy()
    ok = index["ok"].to_numpy(bool)[row]
    noise = pd.read_csv(run / "work" / "noise.csv")
    images = pd.concat([images.loc[ok].reset_index(drop=True), noise], axis=1)
    feats = np.load(cache / "features.npy")[row[ok]].astype(np.float32)
    return images, feats, json.loads((run / "work" / "classes.json").read_text())


def dev_test_features(data: Path, weights: str, cache: Path | None, classes):
    """(dev-test features by the frozen backbone, their class indices); cached in an NPZ file."""
    test = pd.read_csv(data / "test_labels.csv", dtype=str)
    labels = test["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    if cache and cache.exists():
        return np.load(cache)["test"], labels
    from accelerate import Accelerator

    from app.backbone import load_backbone
    from bench.photo_shift import features
    backbone = load_backbone({"weights": weights, "allow_nonstandard": True})
    backbone.visual.eval()
    feats = features(backbone, [data / "test" / n for n in test["image"]], Accelerator(), "test photos")
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, test=feats)
    return feats, labels


def fit_probe(feats, labels, weights, keep, num_classes, wcfg, seed):
    """The head warmup on the rows `keep` (weights > 0 among them): a predict function (balanced logits)."""
    rows = keep & (weights > 0)
    prior = log_class_prior(torch.from_numpy(np.bincount(labels[rows], weights=weights[rows], minlength=num_classes)))
    w, b, _ = train_head(feats[rows], labels[rows], weights[rows], prior, wcfg, seed, show_progress=False)
    return lambda f: (torch.as_tensor(f) @ w.T + b).argmax(1).numpy()


def summarise(frame: pd.DataFrame) -> dict:
    err = 100 * (frame["estimate"] - frame["dev_test"])
    plain = 100 * (frame["estimate_without_control_variate"] - frame["dev_test"])
    noisy = 100 * (frame["noisy_split"] - frame["dev_test"])
    return {
        "splits": int(len(frame)), "split_images_mean": round(float(frame["split_images"].mean()), 1),
        "held_out_share_mean": round(float(frame["held_out_share"].mean()), 4),
        "dev_test_top1_mean": round(float(100 * frame["dev_test"].mean()), 2),
        "mean_error_points": round(float(err.mean()), 2), "sd_points": round(float(err.std()), 2),
        "mae_points": round(float(err.abs().mean()), 2),
        "share_within_3_points": round(float((err.abs() <= 3).mean()), 3),
        "mae_without_control_variate_points": round(float(plain.abs().mean()), 2),
        "noisy_split_mae_points": round(float(noisy.abs().mean()), 2),
        "mae_expected_from_sampling_points": round(float(
            100 * Z_MAE * np.sqrt(frame["dev_test"] * (1 - frame["dev_test"]) / frame["effective_size"]).mean()), 2),
        "variance_left_by_control_variate_mean": round(float(frame["variance_left"].mean()), 3),
        "hold_out_cost_points": round(float(100 * (frame["dev_test_all_images"] - frame["dev_test"]).mean()), 2),
        "hold_out_cost_se_points": round(float(100 * (frame["dev_test_all_images"] - frame["dev_test"]).std()
                                               / math.sqrt(len(frame))), 2),
        **({"labels_part_mean_points": round(float(100 * frame["labels_part"].mean()), 2),
            "shift_part_mean_points": round(float(100 * frame["shift_part"].mean()), 2)}
           if "labels_part" in frame else {}),
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = sorted(summary, key=int)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ks, [summary[k]["mae_points"] for k in ks], "o-", label="MAE, estimate (control variate)")
    ax[0].plot(ks, [summary[k]["mae_without_control_variate_points"] for k in ks], "s--", label="MAE without it")
    ax[0].plot(ks, [abs(summary[k]["mean_error_points"]) for k in ks], "^-.", label="|mean error|: the bias")
    ax[0].plot(ks, [summary[k]["sd_points"] for k in ks], "v-.", label="sd over splits: the draw's luck")
    ax[0].plot(ks, [summary[k]["mae_expected_from_sampling_points"] for k in ks], ":", label="MAE expected from sampling")
    ax[0].axhline(3, color="grey", lw=0.8)
    ax[0].set(xlabel="images per class in the split", ylabel="points of dev-test top-1",
              title="frozen probe: the estimate's error")
    ax[0].legend(fontsize=8)
    ax[1].errorbar(ks, [summary[k]["hold_out_cost_points"] for k in ks],
                   yerr=[1.96 * summary[k]["hold_out_cost_se_points"] for k in ks], fmt="o-")
    ax[1].axhline(0.5, color="grey", lw=0.8)
    ax[1].set(xlabel="images per class in the split", ylabel="dev-test top-1 lost (points)",
              title="frozen probe: the hold-out cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="an audit or training run of DATA/train")
    ap.add_argument("--data", required=True, type=Path, help="folder with test/ and test_labels.csv")
    ap.add_argument("--weights", required=True, help="the backbone the run used (for the test features)")
    ap.add_argument("--config", help="the run's config profile (its warmup and validation sections)")
    ap.add_argument("--per-class", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--splits", type=int, default=40)
    ap.add_argument("--out", required=True, type=Path, help="JSON file (a PNG is written beside it)")
    ap.add_argument("--test-cache", type=Path, help="NPZ file for the test features (written once)")
    ap.add_argument("--truth", type=Path, help="the train images' truth file: splits the error into the labels' "
                    "part and the photos' part (estimate_gap.decompose; diagnosis only)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(a.config)
    images, feats, classes = load_audit(a.run)
    f_test, y_test = dev_test_features(a.data, a.weights, a.test_cache, classes)
    labels, weights, num_classes = images["label"].to_numpy(), images["weight"].to_numpy(float), len(classes)
    score = images["clean_score"].to_numpy(float)
    means = class_mean_scores(labels, score)
    sizes = np.bincount(labels, minlength=num_classes)
    truth = read_truth(a.truth) if a.truth else None
    rows = []
    for s in tqdm(range(a.splits), desc="splits", unit="seed"):
        everything = fit_probe(feats, labels, weights, np.ones(len(labels), bool), num_classes, cfg["warmup"], s)
        all_images = float((everything(f_test) == y_test).mean())
        for k in a.per_class:
            vcfg = {**cfg["validation"], "per_class": k, "max_fraction": 1.0}
            split = choose_split(images, num_classes, {**cfg, "seed": s, "validation": vcfg})
            predict = fit_probe(feats, labels, weights, ~split.held_out, num_classes, cfg["warmup"], s)
            y = labels[split.rows]
            predicted = predict(feats[split.rows])
            correct = predicted == y
            probe = probe_covariate(images, split.rows)
            estimate, size = estimate_with_size(correct, y, score[split.rows], means, probe)
            plain, size_plain = estimate_with_size(correct, y, score[split.rows], means)
            rows.append({"seed": s, "per_class": k, "split_images": len(split.rows),
                         "held_out_share": float(split.held_out.mean()), "estimate": estimate,
                         "estimate_without_control_variate": plain,
                         "noisy_split": noisy_split_top1(correct, y, sizes),
                         "effective_size": size, "variance_left": size_plain / size,
                         "dev_test": float((predict(f_test) == y_test).mean()), "dev_test_all_images": all_images})
            if truth is not None:       # where the error comes from: the labels' weighting or the photos
                parts = decompose(split_table(images, split, classes, predicted), truth, estimate, rows[-1]["dev_test"])
                rows[-1].update(split_true_top1=parts["random_true"], labels_part=parts["labels"],
                                shift_part=parts["shift"])
    frame = pd.DataFrame(rows)
    summary = {str(k): summarise(part) for k, part in frame.groupby("per_class")}
    result = {"what": __doc__.split("\n\n")[0], "run": str(a.run), "data": str(a.data), "weights": a.weights,
              "config": a.config, "model": "frozen linear probe (app.warmup.train_head, warmup config)",
              "by_images_per_class": summary, "splits": frame.round(4).to_dict("records")}
    print(json.dumps(summary, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    plot(summary, a.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
