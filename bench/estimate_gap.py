"""TECH_REPORT.md section 4.5: the estimate-against-dev-test table and the figure of its parts.

Where the estimate's error comes from: a diagnosis with the truth file, which the estimator never reads.

    python bench/estimate_gap.py --bench BENCH_OUT [...] --truth DATA/train_truth.csv [--out DIR] [--only ARM:SEED ...]
                                 [--earlier ESTIMATE_GAP_JSON ...]

BENCH_OUT: `python -m app bench` output folders of one dataset. For every finished run that held out a validation
split (its validation_split.csv holds the exported model's prediction per held-out image), the
random split's figures are recomputed from that table and compared with the measured dev-test top-1:

  weighted     app.validation.estimate_top1, the product's estimate: top-1 against the given labels,
               each image weighted by its clean score over its class's mean clean score and count in
               the split, corrected by the frozen probe's control variate where the run's table or
               noise_scores.csv has the probe's labels (recomputed for runs that also held a trusted split from their noisy random split, a
               uniform draw, and the class means of the run's noise_scores.csv; runs without one are
               left out)
  weighted_plain  the same without the control variate (reported beside the estimate)
  random_true  the random split against the TRUE labels, off-topic images left out, each image
               weighted by 1 / (its draw probability x its true class's training count): the
               class-balanced top-1 on training photos, what an estimator should read if the train
               and test photos were alike
  labels       weighted - random_true    what the noisy labels and the clean-score weighting leave
  shift        random_true - measured    held-out training photos against the dev-test photos: no
                                         train-only correction can see this part

Runs that also held a trusted split (a `split` column: a trusted split drawn among the images the noise stage
keeps, scored plainly, beside a uniform noisy random split) also get that estimate's parts:
  label_noise  trusted - trusted_true    wrong given labels among the trusted images
  selection    trusted_true - random_true   the kept images are the easier ones
Every figure is a few hundred images: about +-3 points of sampling error each. Spearman rank
correlation and mean absolute error of each figure against the measured top-1 and random_true.

  sampling     per model z = (weighted - measured) / the two figures' binomial standard errors (the
               split's at its Kish size, the dev-test's at its size): a mean z^2 near 1 or below says the
               error is the sampling's, which only a larger split shrinks; beside it the mean absolute
               error that sampling alone implies
  pairs        every two models of one bench that held out the same split (`python -m app compare`):
               how often the paired difference of their estimates, and the noisy split's difference,
               order them as the dev-test does; `confident`: pairs whose paired 95% interval excludes 0

--earlier: the per-model figures of earlier outputs (estimate_gap.json of runs since deleted) join the
agreement and sampling summaries; pairs need the runs' tables, so only the live runs are paired.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.studies.bench import agreement  # noqa: E402
from app.compare import random_rows, read_split_table, same_split, split_arrays, split_probe  # noqa: E402
from app.studies.make_noisy import read_truth  # noqa: E402
from app.report import write_json  # noqa: E402
from app.validation import estimate_top1, estimate_with_size, paired_difference  # noqa: E402

PARTS = ("labels", "shift")
FIGURES = ("weighted", "weighted_plain", "trusted", "noisy_split")


def decompose(split: pd.DataFrame, truth: pd.DataFrame, estimate: float, measured: float) -> dict:
    """The random split's figures and parts for one model (see the module docstring). `estimate`:
    the run's reported estimate (the trusted split's, for runs that held one)."""
    split = split.reset_index(drop=True)
    earlier = "split" in split
    trusted = split["split"].eq("trusted") if earlier else pd.Series(False, index=split.index)
    given = random_rows(split)
    labels, score, class_mean, right_given = split_arrays(given)
    weighted, _ = estimate_top1(right_given, labels, score, class_mean, split_probe(given))
    weighted_plain, _ = estimate_top1(right_given, labels, score, class_mean)
    rows = split.merge(truth.drop(columns="given_label"), on="path", how="left", validate="one_to_one")
    in_class = rows["noise"].ne("off_topic") & rows["true_label"].notna()
    right = rows["predicted"].eq(rows["true_label"])
    random = ~trusted & in_class
    true_counts = truth.loc[truth["noise"].ne("off_topic"), "true_label"].value_counts()
    # draw probability: per given class, drawn / its training images (a run with a trusted split: its noisy split is uniform)
    draw_p = (rows.loc[random, "given_label"].map(given["given_label"].value_counts() / truth["given_label"].value_counts())
              if not earlier else 1.0)
    weight = 1.0 / (draw_p * rows.loc[random, "true_label"].map(true_counts))
    random_true = float((right[random] * weight).sum() / weight.sum())
    out = {"estimate": estimate, "weighted": round(weighted, 4), "weighted_plain": round(weighted_plain, 4),
           "control_variate": "probe_agrees" in given, "random_true": round(random_true, 4),
           "measured": measured, "labels": round(weighted - random_true, 4), "shift": round(random_true - measured, 4),
           "random_images": int((~trusted).sum()), "trusted": np.nan, "trusted_true": np.nan,
           "label_noise": np.nan, "selection": np.nan}
    if earlier:
        t = trusted & in_class
        trusted_true = float(right[t].groupby(rows.loc[t, "true_label"]).mean().mean())
        out.update(trusted=estimate, trusted_true=round(trusted_true, 4), label_noise=round(estimate - trusted_true, 4),
                   selection=round(trusted_true - random_true, 4), trusted_images=int(trusted.sum()))
    return out


def test_images(bench: Path) -> int:
    """The dev-test size of a bench folder (its bench_results.json)."""
    return int(json.loads((bench / "bench_results.json").read_text())["dataset"]["test_images"])


def sampling(split: pd.DataFrame, measured: float, n_test: int) -> dict:
    """How far the weighted estimate may fall from the measured top-1 by sampling alone: both figures'
    binomial standard errors (the split's at its effective size: Kish's, enlarged by the control
    variate), z = error / that, and the mean absolute error they imply (sqrt(2 / pi) x the standard error)."""
    given = random_rows(split)
    labels, score, means, right = split_arrays(given)
    estimate, size = estimate_with_size(right, labels, score, means, split_probe(given))
    kish = estimate_with_size(right, labels, score, means)[1]
    se = math.sqrt(estimate * (1 - estimate) / size + measured * (1 - measured) / n_test)
    return {"effective_size": round(size, 1), "variance_left_by_control_variate": round(kish / size, 3),
            "sampling_se_points": round(100 * se, 2),
            "sampling_mae_points": round(100 * se * math.sqrt(2 / math.pi), 2), "z": round((estimate - measured) / se, 3)}


def pairs(tables: list[pd.DataFrame], table: pd.DataFrame) -> dict:
    """Every two models of one bench that held out the same split (same data and seed): does the paired
    difference of their estimates (app.compare) order them as the dev-test does? And the noisy split's?
    `confident`: the pairs whose paired 95% interval excludes 0."""
    out = []
    for i in range(len(tables)):
        for j in range(i + 1, len(tables)):
            if table["bench"][i] != table["bench"][j] or not same_split(tables[i], tables[j]):
                continue
            labels, score, means, right_i = split_arrays(tables[i])
            delta, interval = paired_difference(right_i, split_arrays(tables[j])[3], labels, score, means,
                                                split_probe(tables[i]))
            measured = table["measured"][i] - table["measured"][j]
            noisy = table["noisy_split"][i] - table["noisy_split"][j]
            out.append({"a": f"{table['bench'][i]}/{table['arm'][i]} s{table['seed'][i]}",
                        "b": f"{table['arm'][j]} s{table['seed'][j]}", "measured_points": round(100 * measured, 1),
                        "estimate_points": round(100 * delta, 1), "interval95": [round(100 * x, 1) for x in interval],
                        "noisy_split_points": round(100 * noisy, 1), "estimate_right": bool(np.sign(delta) == np.sign(measured)),
                        "noisy_split_right": bool(np.sign(noisy) == np.sign(measured)),
                        "confident": bool(interval[0] > 0 or interval[1] < 0)})
    frame = pd.DataFrame(out)
    if frame.empty:
        return {"pairs": 0}
    confident = frame[frame["confident"]]
    return {"pairs": len(frame), "estimate_orders_right": round(float(frame["estimate_right"].mean()), 3),
            "noisy_split_orders_right": round(float(frame["noisy_split_right"].mean()), 3),
            "confident_pairs": len(confident),
            "confident_orders_right": round(float(confident["estimate_right"].mean()), 3) if len(confident) else None,
            "list": out}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, nargs="+", help="`python -m app bench` output folders (same data)")
    p.add_argument("--truth", required=True, help="train_truth.csv of the benchmark's data")
    p.add_argument("--out", help="folder for estimate_gap.json and .png (default: --bench)")
    p.add_argument("--only", nargs="+", metavar="ARM:SEED", help="only these runs (e.g. the models an estimator "
                   "was not chosen on)")
    p.add_argument("--earlier", nargs="+", default=[], metavar="ESTIMATE_GAP_JSON",
                   help="per-model figures of earlier outputs to pool with these runs (same data)")
    args = p.parse_args(argv)
    out = Path(args.out or args.bench[0])
    truth = read_truth(args.truth)
    models, tables = [], []
    for bench, result_file in ((Path(b), f) for b in args.bench for f in sorted(Path(b).glob("*/seed*/result.json"))):
        result = json.loads(result_file.read_text())
        model_dir = bench / Path(result["model"]).parent
        if model_dir != result_file.parent or result.get("estimated_test_top1") is None:
            continue                                    # infer-only arms reuse a model; no validation split
        if args.only and f"{result['arm']}:{result['seed']}" not in args.only:
            continue
        try:
            split = read_split_table(model_dir)
        except ValueError as e:
            print(f"estimate_gap: {e}; left out")
            continue
        models.append({"bench": bench.name, "arm": result["arm"], "seed": result["seed"],
                       **decompose(split, truth, result["estimated_test_top1"], result["top1"]),
                       "noisy_split": result["noisy_split_top1"], **sampling(split, result["top1"], test_images(bench))})
        tables.append(random_rows(split))
    live = {(m["bench"], m["arm"], m["seed"]) for m in models}
    for earlier in args.earlier:
        models += [m for m in json.loads(Path(earlier).read_text())["models"]
                   if (m["bench"], m["arm"], m["seed"]) not in live]
    if not models:
        raise SystemExit(f"estimate_gap: no finished run with a validation split under {' '.join(args.bench)}")
    table = pd.DataFrame(models)
    mean = {k: round(float(table[k].mean()), 4) for k in ("weighted", "measured", *PARTS, "label_noise", "selection")}
    agreements = {figure: {ref: agreement(table.loc[table[figure].notna(), figure],
                                          table.loc[table[figure].notna(), ref]) for ref in ("measured", "random_true")}
                  for figure in FIGURES if table[figure].notna().sum() >= 3}
    sampling_check = {"mean_z_squared": round(float((table["z"] ** 2).mean()), 2),
                      "mean_variance_left_by_control_variate": round(float(table["variance_left_by_control_variate"].mean()), 3),
                      "mae_expected_from_sampling_points": round(float(table["sampling_mae_points"].mean()), 2),
                      "mae_observed_points": round(float(100 * (table["weighted"] - table["measured"]).abs().mean()), 2)}
    report = {"what": __doc__.split("\n\n")[0], "models": models, "mean": mean, "agreement": agreements,
              "sampling": sampling_check, "pairs": pairs(tables, table.iloc[:len(tables)])}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "estimate_gap.json", report)
    plot(table, out / "estimate_gap.png")
    columns = ["weighted", "weighted_plain", "noisy_split", "trusted", "random_true", "measured", *PARTS]
    print("| bench | arm | seed | " + " | ".join(columns) + " |\n|---|---|---|" + "---:|" * len(columns))
    for m in models:
        print(f"| {m['bench']} | {m['arm']} | {m['seed']} | " + " | ".join(f"{100 * m[c]:.1f}" for c in columns) + " |")
    print("mean (points): " + ", ".join(f"{k} {100 * v:+.1f}" for k, v in mean.items() if k not in ("weighted", "measured")))
    print("sampling: " + ", ".join(f"{k} {v}" for k, v in sampling_check.items()))
    print("pairs on a shared split: " + json.dumps({k: v for k, v in report["pairs"].items() if k != "list"}))
    for figure, refs in agreements.items():
        print(f"{figure}: " + "; ".join(f"against {ref}: Spearman {a['spearman']}, MAE {a['mae_points']} points "
                                        f"(mean error {a['mean_error_points']:+})" for ref, a in refs.items()))
    return report


def plot(table: pd.DataFrame, path: Path) -> None:
    """Left: the weighted estimate's error in its two parts per model. Right: each figure against the
    measured top-1 (the diagonal is a perfect estimate)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [f"{a} s{s}" for a, s in zip(table["arm"], table["seed"])]
    fig, (ax, sc) = plt.subplots(1, 2, figsize=(max(6, 0.6 * len(names) + 2) + 5.5, 4.6),
                                 gridspec_kw={"width_ratios": [max(6, 0.6 * len(names) + 2), 5.5]})
    x, width = np.arange(len(names)), 0.35
    for i, part in enumerate(PARTS):
        ax.bar(x + (i - 0.5) * width, 100 * table[part], width, label=part)
    ax.plot(x, 100 * (table["weighted"] - table["measured"]), "k_", markersize=16, mew=2, label="weighted - measured")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("points of top-1")
    ax.set_title("Weighted estimate minus dev-test top-1, in parts\n(truth file of the train images: diagnosis only)",
                 fontsize=9)
    ax.legend(fontsize=7)
    measured = 100 * table["measured"]
    for figure, marker, colour in (("weighted", "o", "tab:green"), ("weighted_plain", "x", "tab:olive"),
                                   ("trusted", "^", "tab:blue"),
                                   ("noisy_split", "s", "tab:red")):
        if table[figure].isna().all():
            continue
        sc.scatter(measured, 100 * table[figure], marker=marker, color=colour, label=figure, s=22)
    ends = [min(sc.get_xlim()[0], sc.get_ylim()[0]), max(sc.get_xlim()[1], sc.get_ylim()[1])]
    sc.plot(ends, ends, color="0.5", ls="--", lw=1)
    sc.set(xlabel="dev-test top-1 %", ylabel="figure from the training set %", title="estimates against the test")
    sc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
