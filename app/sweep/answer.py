"""The sweep's answer: its runs ranked by app/compare.py on their shared validation split, the
recommendation, best.yaml and the command reproducing it, the seconds the shared stages saved.

OUT_ROOT/sweep.md (for people), sweep.json (everything), sweep.png (paired differences from the best;
per-epoch estimates), best.yaml.
"""
import json
import math
import shlex
from pathlib import Path

import yaml

from .. import compare
from . import lookup, settings_with
from ..config import changed, from_args, shaping
from ..report import write_json

IMAGE = "clip-ft"                 # the image name docker/README.md builds
# options that name the weights: a sweep on other weights (a proxy) reproduces in the container on
# the image's OpenAI weights
WEIGHT_OPTIONS = {"--weights": 1, "--allow-nonstandard-backbone": 0}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _drop(options: list[str], names: dict[str, int]) -> list[str]:
    """`options` without the options in `names` (name -> how many values follow it)."""
    out, skip = [], 0
    for item in options:
        if skip:
            skip -= 1
            continue
        name = item.split("=", 1)[0]
        if name in names:
            skip = names[name] if "=" not in item else 0
            continue
        out.append(item)
    return out


def _unique(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def best_yaml(run: dict, train_args) -> tuple[dict, list[str]]:
    """(the --config file of `run`: every setting of its command line that differs from the defaults
    and shapes the model or its inference (grid values, --config, --set, --epochs, --image-size,
    --seed...); the validation keys left out of it). Where the program runs (weights file, folders,
    precision, workers) is the reproduction's own. The validation split stays the default's: a sweep
    may hold out a larger split than the final run should."""
    cfg = settings_with(train_args, run["sets"])
    out, left_out = {}, []
    for key, value in {**changed(cfg), **{k: lookup(cfg, k) for k in run["settings"]}}.items():
        if key.split(".")[0] == "validation":
            left_out.append(key)
            continue
        if key not in shaping(cfg) and not key.startswith("infer."):
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out, left_out


def seconds_saved(reports: dict[str, dict]) -> dict[str, float]:
    """Per stage, the seconds the reusing runs did not spend: for every stage a run took from the
    shared store, what its computing run spent on it."""
    saved: dict[str, float] = {}
    for report in reports.values():
        for stage, used in (report.get("shared_stages") or {}).items():
            if used.get("reused"):
                saved[stage] = round(saved.get(stage, 0.0) + float(used["seconds_when_computed"]), 2)
    return saved


def default_run(runs: list[dict], baseline: dict) -> dict | None:
    """The run whose swept values are all `baseline`'s (the defaults under the sweep's options), if any."""
    return next((r for r in runs if all(_same(v, baseline[k]) for k, v in r["settings"].items())), None)


def recommend(rows: list[dict], runs: list[dict], baseline: dict) -> tuple[dict, str, list[str]]:
    """(the recommended run, why, the runs tied with the best). Tied: the best and every run whose
    paired interval against it includes 0. Among the tied, the default (`baseline`'s values for every
    swept key) when it is one of them, else the best estimate."""
    by_name = {r["name"]: r for r in runs}
    default = default_run(runs, baseline)
    if not rows:
        pick = default or runs[0]
        return pick, "no run has an estimate (no validation split): the default settings" if default else \
            "no run has an estimate (no validation split)", []
    groups = {}
    for row in rows:
        groups.setdefault(row["split_group"], []).append(row)
    group = max(groups.values(), key=len)
    best = next(r for r in group if r["best_in_group"])
    tied = [best["run"]] + [r["run"] for r in group if "minus_best" in r and r["minus_best_interval95"][1] >= 0]
    if len(tied) == 1:
        return by_name[best["run"]], "the best estimate, separated from every other run (paired 95% intervals " \
                                     "exclude 0)", tied
    if default and default["name"] in tied:
        return default, (f"not separable: {len(tied)} runs are within the paired 95% interval of the best "
                         f"({', '.join(tied)}); among them the default settings"), tied
    return by_name[best["run"]], (f"not separable: {len(tied)} runs are within the paired 95% interval of the "
                                  f"best ({', '.join(tied)}); the default is not among them: the best "
                                  "estimate"), tied


def commands(train_dir: Path, out_root: Path, options: list[str]) -> dict[str, str]:
    """The command reproducing the recommended run with best.yaml, here and in the container."""
    rest = _drop(options, {"--config": 1, "--set": 1})
    best = out_root / "best.yaml"
    here = ["./run_train.sh", str(train_dir), str(out_root / "final"), "--config", str(best), *rest]
    docker = ["docker", "run", "--rm", "--gpus", "all", "--shm-size=16g", "-v", "/data:/data",
              "-v", "/outputs:/outputs", "-v", f"{best.resolve()}:/config/best.yaml:ro", IMAGE,
              "run_train.sh", "/data/train", "/outputs", "--config", "/config/best.yaml",
              *_drop(rest, WEIGHT_OPTIONS)]
    return {"run_train": shlex.join(here), "docker": shlex.join(docker)}


def plot(rows: list[dict], reports: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * max(len(reports), 4) + 1.6))
    if rows:
        compare.plot_differences(left, rows)
    left.set_title("each run minus the best (paired 95% interval; red: separated)", fontsize=9)
    for name, report in reports.items():
        epochs = [e for e in report.get("finetune_epochs", []) if e.get("estimated_test_top1") is not None]
        if epochs:
            right.plot([e["epoch"] for e in epochs], [100 * e["estimated_test_top1"] for e in epochs], "o-",
                       label=name, ms=3)
    right.set_xlabel("fine-tuning epoch")
    right.set_ylabel("estimated test top-1, %")
    right.set_title("estimate after every epoch", fontsize=9)
    if right.lines:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_answer(train_dir: Path, out_root: Path, runs: list[dict], train_args, options: list[str],
                 wall_seconds: float) -> str:
    """Write sweep.md, sweep.json, sweep.png and best.yaml; return sweep.md's text."""
    reports = {r["name"]: json.loads((r["dir"] / "train_report.json").read_text()) for r in runs}
    loaded, no_estimate = [], []
    for r in runs:
        try:
            loaded.append({**compare.load_run(r["dir"]), "run": r["name"]})
        except (FileNotFoundError, ValueError):
            no_estimate.append(r["name"])
    rows = compare.compare(loaded) if loaded else []
    baseline = from_args(train_args)              # the defaults under the sweep's own options
    baseline = {k: lookup(baseline, k) for k in runs[0]["settings"]}
    pick, why, tied = recommend(rows, runs, baseline)
    config, left_out = best_yaml(pick, train_args)
    header = (f"# python -m app sweep: the recommended settings for {train_dir} ({pick['name']}: {why}).\n"
              f"# Train with them: run_train.sh TRAIN_DIR OUT_DIR --config best.yaml\n")
    (out_root / "best.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    cmds = commands(train_dir, out_root, options)
    saved = seconds_saved(reports)
    row_of = {r["run"]: r for r in rows}
    result = {
        "what": "python -m app sweep: every run's estimated test top-1 and its paired difference from the best "
                "on the validation split they share",
        "train_dir": str(train_dir), "options": options, "grid": {k: _unique(r["settings"][k] for r in runs)
                                                                   for k in runs[0]["settings"]},
        "runs": [{"name": r["name"], "settings": r["settings"], "dir": str(r["dir"]),
                  **{k: v for k, v in row_of.get(r["name"], {}).items() if k != "run"},
                  "estimate_per_epoch": [e.get("estimated_test_top1") for e in reports[r["name"]].get("finetune_epochs", [])],
                  "stage_seconds": reports[r["name"]].get("stage_seconds"),
                  "total_seconds": reports[r["name"]].get("total_seconds"),
                  "shared_stages": reports[r["name"]].get("shared_stages")} for r in runs],
        "runs_without_estimate": no_estimate,
        "recommended": pick["name"], "why": why, "tied_with_best": tied, "default_run": (default_run(runs, baseline) or {}).get("name"),
        "sweep_split": runs[0].get("split", []) if runs else [],
        "best_yaml": config, "left_out_of_best_yaml": left_out, "reproduce": cmds,
        "seconds_saved_by_shared_stages": saved, "seconds_saved_total": round(sum(saved.values()), 2),
        "runs_total_seconds": round(sum(rep.get("total_seconds") or 0 for rep in reports.values()), 2),
        "wall_seconds_this_invocation": round(wall_seconds, 2),
    }
    write_json(out_root / "sweep.json", result)
    plot(rows, reports, out_root / "sweep.png")
    lines = [f"# Sweep of {train_dir}", "",
             f"{len(runs)} runs; options given to every run: `{shlex.join(options) or '(none)'}`"
             + (f"; the sweep's split: `{' '.join(runs[0]['split'])}`" if runs and runs[0].get("split") else "")
             + ".", "",
             compare.markdown(rows) if rows else "No run has an estimate (no validation split).", ""]
    if no_estimate:
        lines += [f"Without an estimate (no validation split): {', '.join(no_estimate)}.", ""]
    not_kept = ", ".join(left_out) or ("the sweep's split" if result["sweep_split"] else "")
    lines += [f"**Recommended: {pick['name']}** ({why}).", "",
              f"best.yaml holds its settings"
              f"{f' (without {not_kept}: the final run holds out the default split)' if not_kept else ''}. Reproduce it:", "",
              f"    {cmds['run_train']}", "", "in the container (best.yaml mounted; the image's OpenAI weights):", "",
              f"    {cmds['docker']}", "",
              f"To submit it: `cp {out_root / 'best.yaml'} configs/submission.yaml` in the repository and rebuild "
              "the image; every command then applies it, the organisers' plain `run_train.sh /data/train` "
              "included.", "",
              f"Shared stages: {result['seconds_saved_total']:.0f} s saved "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in saved.items()) or 'nothing reused'}); the runs took "
              f"{result['runs_total_seconds']:.0f} s in all, this invocation {wall_seconds:.0f} s of wall time."]
    text = "\n".join(lines) + "\n"
    (out_root / "sweep.md").write_text(text)
    return text
