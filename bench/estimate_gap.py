"""Where the trusted estimate's error comes from (issue 13): a diagnosis with the truth file, which the
estimator never reads.

    python bench/estimate_gap.py --bench BENCH_OUT --truth DATA/train_truth.csv [--out DIR]

BENCH_OUT: a `python -m app bench` output folder. For every finished run whose model held out a
trusted split (its validation_split.csv holds the exported model's prediction per held-out image),
the gap between the estimate and the measured dev-test top-1 is split into three parts that add up:

  label_noise  estimate - trusted_true    wrong given labels among the trusted images (scored wrong)
  selection    trusted_true - random_true the trusted images are drawn among those the noise stage keeps
  shift        random_true - measured     held-out training images against the dev-test images

trusted_true: the trusted split scored against the TRUE labels (class-balanced mean, off-topic images
left out: the test has none). random_true: the noisy random split (a uniform draw of the training
images) against the true labels, off-topic images left out, each image weighted by 1 / its true
class's training count so that every class counts alike, as in the class-balanced test. Only
`shift` is beyond anything drawn from the training set: a train-only correction cannot see it.
Every figure is a few hundred images: about +-3 points of sampling error each.

A candidate estimator from training data alone is scored beside the product's (posterior_weighted):
the noisy random split against its GIVEN labels, each image weighted by the noise stage's clean
score, class-balanced (per given class: sum(right x score) / sum(score); mean over the classes).
Every figure is compared with the measured dev-test top-1 and with random_true (truth file, training
images only: what an estimator should read if the train and test photos were alike): Spearman rank
correlation and mean absolute error.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.bench import agreement  # noqa: E402
from app.report import write_json  # noqa: E402

PARTS = ("label_noise", "selection", "shift")


def load_truth(truth_csv: Path) -> pd.DataFrame:
    truth = pd.read_csv(truth_csv, dtype=str)[["path", "true_label", "noise"]]
    truth["path"] = truth["path"].str.split("/", n=1).str[1]          # train/<class>/<file> -> <class>/<file>
    return truth


def decompose(split: pd.DataFrame, truth: pd.DataFrame, estimate: float, measured: float) -> dict:
    """The three parts of estimate - measured for one model (see the module docstring)."""
    rows = split.merge(truth, on="path", how="left", validate="one_to_one")
    rows = rows[rows["noise"].ne("off_topic") & rows["true_label"].notna()]
    right = rows["predicted"].eq(rows["true_label"])
    trusted = rows["split"].eq("trusted")
    trusted_true = float(right[trusted].groupby(rows.loc[trusted, "true_label"]).mean().mean())
    counts = truth.loc[truth["noise"].ne("off_topic"), "true_label"].value_counts()
    random = ~trusted
    weight = 1.0 / rows.loc[random, "true_label"].map(counts)
    random_true = float((right[random] * weight).sum() / weight.sum())
    given = split[~split["split"].eq("trusted")]
    score, right_given = given["clean_score"].astype(float), given["predicted"].eq(given["given_label"])
    by_class = pd.DataFrame({"hit": right_given * score, "score": score, "label": given["given_label"]}) \
        .groupby("label")[["hit", "score"]].sum()
    by_class = by_class[by_class["score"] > 0]
    posterior_weighted = float((by_class["hit"] / by_class["score"]).mean())
    return {"estimate": estimate, "posterior_weighted": round(posterior_weighted, 4),
            "trusted_true": round(trusted_true, 4), "random_true": round(random_true, 4),
            "measured": measured, "label_noise": round(estimate - trusted_true, 4),
            "selection": round(trusted_true - random_true, 4), "shift": round(random_true - measured, 4),
            "trusted_images": int(trusted.sum()), "random_images": int(random.sum())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, help="a `python -m app bench` output folder")
    p.add_argument("--truth", required=True, help="train_truth.csv of the benchmark's data")
    p.add_argument("--out", help="folder for estimate_gap.json and .png (default: --bench)")
    args = p.parse_args(argv)
    bench, out = Path(args.bench), Path(args.out or args.bench)
    truth = load_truth(Path(args.truth))
    models = []
    for result_file in sorted(bench.glob("*/seed*/result.json")):
        result = json.loads(result_file.read_text())
        model_dir = bench / Path(result["model"]).parent
        if model_dir != result_file.parent or result.get("estimated_test_top1") is None:
            continue                                    # infer-only arms reuse a model; no trusted split
        split = pd.read_csv(model_dir / "validation_split.csv", dtype=str)
        models.append({"arm": result["arm"], "seed": result["seed"],
                       **decompose(split, truth, result["estimated_test_top1"], result["top1"]),
                       "noisy_split": result["noisy_split_top1"]})
    if not models:
        raise SystemExit(f"estimate_gap: no finished run with a trusted split under {bench}")
    table = pd.DataFrame(models)
    mean = {k: round(float(table[k].mean()), 4) for k in ("estimate", "measured", *PARTS)}
    agreements = {figure: {ref: agreement(table[figure], table[ref]) for ref in ("measured", "random_true")}
                 for figure in ("estimate", "noisy_split", "posterior_weighted")}
    report = {"what": __doc__.split("\n\n")[0], "models": models, "mean": mean, "agreement": agreements}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "estimate_gap.json", report)
    plot(table, out / "estimate_gap.png")
    columns = ["estimate", "noisy_split", "posterior_weighted", "trusted_true", "random_true", "measured", *PARTS]
    print("| arm | seed | " + " | ".join(columns) + " |\n|---|---|" + "---:|" * len(columns))
    for m in models:
        print(f"| {m['arm']} | {m['seed']} | " + " | ".join(f"{100 * m[c]:.1f}" for c in columns) + " |")
    print("mean (points): " + ", ".join(f"{k} {100 * v:+.1f}" for k, v in mean.items() if k in PARTS))
    for figure, refs in agreements.items():
        print(f"{figure}: " + "; ".join(f"against {ref}: Spearman {a['spearman']}, MAE {a['mae_points']} points "
                                        f"(mean error {a['mean_error_points']:+})" for ref, a in refs.items()))
    return report



def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [f"{a} s{s}" for a, s in zip(table["arm"], table["seed"])]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 4))
    x, width = np.arange(len(names)), 0.25
    for i, part in enumerate(PARTS):
        ax.bar(x + (i - 1) * width, 100 * table[part], width, label=part)
    ax.plot(x, 100 * (table["estimate"] - table["measured"]), "k_", markersize=18, label="estimate - measured")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("points of top-1")
    ax.set_title("Trusted estimate minus dev-test top-1, in parts\n(truth file of the train images: diagnosis only)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
