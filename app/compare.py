"""Rank training runs before submitting: each run's estimated test top-1, and how far each run is from
the best one, paired on the validation split they share.

    python -m app compare OUT_DIR OUT_DIR [...] [--out DIR]

OUT_DIR: what run_train.sh wrote (validation_split.csv, train_report.json). Runs of the same train folder,
seed and validation settings hold out the same split, scored with the same clean scores: their
difference is paired (only the images where the two models disagree move it), so its interval is far
narrower than either estimate's, and it is the figure to rank them by. Runs with different splits
(another seed, other data) are listed with their own estimates only: their difference carries both
splits' sampling errors. With --out: compare.json and compare.png (the differences with their intervals).
"""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from .report import write_json
from .validation import ProbeCovariate, estimate_top1, paired_difference


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", type=Path, help="training output folders (run_train.sh OUT_DIR)")
    p.add_argument("--out", type=Path, help="folder for compare.json and compare.png")


def read_split_table(run: Path) -> pd.DataFrame:
    """A run's validation_split.csv, with each image's class mean clean score and the probe's control
    variate (from the run's noise_scores.csv for tables written before the estimate needed them; a
    noise_scores.csv without probe labels leaves the table without the control variate)."""
    table_file = run / "validation_split.csv"
    if not table_file.is_file():
        raise FileNotFoundError(f"{run}: no validation_split.csv (a run with validation.per_class 0, an "
                                f"unfinished run, or not a training output folder)")
    table = pd.read_csv(table_file, dtype={"path": str, "split": str, "given_label": str, "predicted": str})
    if "class_mean_score" in table and "probe_agrees" in table:
        return table
    scores_file = run / "noise_scores.csv"
    if not scores_file.is_file():
        if "class_mean_score" in table:
            return table
        raise ValueError(f"{table_file} has no class_mean_score column and {run} no noise_scores.csv to "
                         f"compute it from: retrain the run to compare it")
    scores = pd.read_csv(scores_file, dtype={"path": str, "given_label": str, "probe_label": str})
    by_class = scores.groupby("given_label")
    if "class_mean_score" not in table:
        table["class_mean_score"] = table["given_label"].map(by_class["clean_score"].mean())
    if "probe_label" in scores and "probe_agrees" not in table:
        agrees = scores["probe_label"].eq(scores["given_label"]).astype(float)
        weighted = (agrees * scores["clean_score"]).groupby(scores["given_label"]).sum()
        table["probe_agrees"] = table["path"].map(pd.Series(agrees.to_numpy(int), index=scores["path"]))
        table["class_probe_rate"] = table["given_label"].map(weighted / by_class["clean_score"].sum())
    return table


def random_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows drawn uniformly within each class: all of them, or the noisy random half of a table
    that also holds a trusted split (column `split`)."""
    if "split" not in table:
        return table
    return table[table["split"].ne("trusted")].drop(columns="split").reset_index(drop=True)


def split_arrays(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(class codes, clean scores, class mean scores, right against the given label) of a split table:
    what validation.estimate_top1 and paired_difference take."""
    labels = pd.factorize(table["given_label"])[0]
    means = table.groupby(labels)["class_mean_score"].first().to_numpy(float)
    right = table["predicted"].eq(table["given_label"]).to_numpy()
    return labels, table["clean_score"].to_numpy(float), means, right


def split_probe(table: pd.DataFrame) -> ProbeCovariate | None:
    """The control variate of a split table (None for a table without it: the plain estimate)."""
    if "probe_agrees" not in table:
        return None
    labels = pd.factorize(table["given_label"])[0]
    return ProbeCovariate(table["probe_agrees"].to_numpy(float),
                          table.groupby(labels)["class_probe_rate"].first().to_numpy(float))


def load_run(run: Path) -> dict:
    """A run's split table (random rows) and what its report says of it."""
    report = json.loads((run / "train_report.json").read_text()) if (run / "train_report.json").is_file() else {}
    return {"run": str(run), "table": random_rows(read_split_table(run)), "seed": report.get("seed"),
            "code_version": report.get("code_version")}


def same_split(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two runs held out the same images with the same labels, clean scores and control variate
    (same rows, same order; scores equal to the 4 decimals of noise_scores.csv)."""
    columns = ["clean_score", "class_mean_score"] + (["probe_agrees", "class_probe_rate"] if "probe_agrees" in a else [])
    return (len(a) == len(b) and a["path"].equals(b["path"]) and a["given_label"].equals(b["given_label"])
            and ("probe_agrees" in a) == ("probe_agrees" in b)
            and all(np.allclose(a[c], b[c], rtol=0, atol=1e-3) for c in columns))


def compare(runs: list[dict]) -> list[dict]:
    """One row per run: its estimate and interval, its split group, and (in a group of two or more) its
    paired difference from the group's best run with a 95% interval."""
    groups: list[list[dict]] = []
    for r in runs:
        home = next((g for g in groups if same_split(g[0]["table"], r["table"])), None)
        if home is None:
            groups.append([r])
        else:
            home.append(r)
    rows = []
    for number, group in enumerate(groups, 1):
        t = group[0]["table"]
        labels, score, means, _ = split_arrays(t)
        probe = split_probe(t)
        right = {r["run"]: split_arrays(r["table"])[3] for r in group}
        figures = {run: estimate_top1(c, labels, score, means, probe) for run, c in right.items()}
        best = max(figures, key=lambda run: figures[run][0])
        for r in group:
            row = {"run": r["run"], "split_group": number, "split_images": len(t), "seed": r["seed"],
                   "code_version": r["code_version"], "estimate": round(figures[r["run"]][0], 4),
                   "interval95": [round(x, 4) for x in figures[r["run"]][1]], "best_in_group": r["run"] == best}
            if len(group) > 1 and r["run"] != best:
                delta, interval = paired_difference(right[r["run"]], right[best], labels, score, means, probe)
                row.update(minus_best=round(delta, 4), minus_best_interval95=[round(x, 4) for x in interval],
                           images_differing=int((right[r["run"]] != right[best]).sum()),
                           verdict="worse than the best" if interval[1] < 0 else "not separable from the best")
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| run | split | estimate % [95%] | minus the group's best, points [95%, paired] | verdict |",
             "|---|---|---|---|---|"]
    group_size = Counter(r["split_group"] for r in rows)
    for r in sorted(rows, key=lambda r: (r["split_group"], -r["estimate"])):
        lo, hi = (100 * x for x in r["interval95"])
        if "minus_best" in r:
            diff = (f"{100 * r['minus_best']:+.1f} [{100 * r['minus_best_interval95'][0]:+.1f}, "
                    f"{100 * r['minus_best_interval95'][1]:+.1f}] ({r['images_differing']} images differ)")
        else:
            diff = "best" if group_size[r["split_group"]] > 1 else "alone on its split"
        lines.append(f"| {r['run']} | {r['split_group']} ({r['split_images']} images) | {100 * r['estimate']:.1f} "
                     f"[{lo:.1f}, {hi:.1f}] | {diff} | {r.get('verdict', '')} |")
    if len(group_size) > 1:
        lines.append("\nRuns on different splits (another seed or other data) are not paired: compare their "
                     "estimates only within their intervals, or retrain with the same seed.")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Each run's difference from its group's best, with the paired 95% interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    plot_differences(ax, rows)
    ax.set_title("compare: runs ranked on their shared validation split (star: the best)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_differences(ax, rows: list[dict]) -> None:
    """On `ax`: each run's difference from its group's best with its paired 95% interval (red: the
    interval excludes 0), the best as a star."""
    rows = sorted(rows, key=lambda r: (r["split_group"], -r["estimate"]))
    for y, r in enumerate(rows):
        if "minus_best" in r:
            lo, hi = (100 * x for x in r["minus_best_interval95"])
            ax.errorbar(100 * r["minus_best"], y, xerr=[[100 * r["minus_best"] - lo], [hi - 100 * r["minus_best"]]],
                        fmt="o", color="tab:red" if hi < 0 else "tab:blue", capsize=3)
        else:
            ax.plot(0, y, "k*", markersize=10)
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{Path(r['run']).name} (split {r['split_group']}, {100 * r['estimate']:.1f}%)"
                                     for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("estimated test top-1 minus the best run on the same split, points (paired 95% interval)")


def run(args) -> None:
    rows = compare([load_run(r) for r in args.runs])
    print(markdown(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "compare.json", {"what": __doc__.split("\n\n")[0], "runs": rows})
        plot(rows, args.out / "compare.png")
