"""The benchmark: the recipe against the baselines and the clean-label ceiling, in one command.

    python -m app bench [--data DIR | --train DIR --test DIR --test-labels CSV --truth CSV]
                        [--weights FILE|openai] [--config FILE] [--arms a,b,...] [--seeds 0 1] [--out DIR]
                        [--set k=v] [--finished-only] [--publish DIR] [--update-report TECH_REPORT.md]

Every arm is one run of the product itself (run_train.sh, then run_infer.sh) under one config
profile (--config) with a few config overrides, so an arm measures exactly what a user would get
with those settings. An infer-only arm (a test-time option) reuses the trained model of another arm
of the same seed and runs run_infer.sh alone. All arms share one frozen-feature cache. The test
labels are used for scoring only, after inference.

Default: ../shared/data/flowers102-noisy with the proxy backbone and the proxy profile
configs/proxy-cpu.yaml (PROXY numbers, not CLIP numbers). With `--weights openai` (or OpenAI's
ViT-B-32.pt), `--config app/defaults.yaml` (the contest default) and any dataset in the competition
layout, the same command runs the study on real CLIP.

Beside each arm's measured test top-1 stand the training run's own estimate of it
(estimated_test_top1, app/validation.py: the held-out split weighted by the noise stage's clean
scores; an infer-only arm shows its model's) and the same images' plain noisy-label top-1; over the trained models (arms x seeds, at least 3) the summary gives the
Spearman rank correlation and the mean absolute error of each against the measured top-1. The test
labels are only compared against: nothing in the estimate is chosen or fitted on them.

Writes OUT/bench_results.json, OUT/bench_results.md, OUT/bench_results.png (+ bench_estimate.png,
the estimate against the measured top-1, when runs have estimates) and one folder per run
(OUT/<arm>/seed<k>/, with the product's own reports). A run whose result.json exists is reused
(an infer-only run: unless the model it used was trained again since), and one whose model.pt exists
is only inferred and scored: delete its folder to run it again.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import yaml
from tqdm import tqdm

from .. import code_version
from ..report import cpu_name, write_json

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flowers102-noisy"
DEFAULT_WEIGHTS = ROOT.parent / "shared" / "models" / "proxy-vit-s8-64.pt"
DEFAULT_CONFIG = ROOT / "configs" / "proxy-cpu.yaml"


class Arm(NamedTuple):
    what: str                     # one line for the table
    overrides: dict               # config overrides on top of the profile (--config)
    model_of: str | None = None   # infer-only: no training, the model of this arm (same seed) is inferred


# the baselines: plain CE (no label smoothing, no weight averaging), no noise stage, no prior, no regulariser
PLAIN = {"noise.enabled": False, "prior_correction": False, "finetune.loss": "ce", "finetune.label_smoothing": 0,
         "finetune.reg_lambda": 0, "finetune.ema_decay": 0}
# recipe-v1: a smaller recipe tuned on the 64-px proxy (native size, rank-8 LoRA on the last 4 blocks, GCE)
RECIPE_V1 = {"input.image_size": "native", "lora.rank": 8, "lora.alpha": 16, "lora.last_blocks": 4,
             "lora.targets": ["q", "v", "out", "fc", "proj"], "lora.train_pos_embed": False, "finetune.loss": "gce",
             "finetune.label_smoothing": 0, "finetune.ema_decay": 0, "finetune.lr": 0.002,
             "finetune.batch_size": 64, "finetune.epochs": 4}
ARMS = {
    "linear_probe_ce": Arm("frozen backbone, linear head, plain CE, no noise handling, no prior",
                           {**PLAIN, "finetune.tune": "none"}),
    "full_ft_ce": Arm("head warmup, then every visual weight trained with plain CE (lr 3e-5: full fine-tuning "
                      "of CLIP takes 1e-5 to 3e-5, FIELD_NOTES), no noise handling, no prior",
                      {**PLAIN, "finetune.tune": "full", "finetune.lr": 3e-5, "lora.train_pos_embed": False}),
    "lora_ce": Arm("head warmup + LoRA with plain CE: no noise stage, no regulariser, no averaging, no prior",
                   PLAIN),
    "recipe": Arm("the profile as is: noise stage, warmup, noise-aware LoRA (CE + label smoothing, weights, "
                  "regulariser, weight averaging) at the profile's input size, balanced prior", {}),
    "clean_oracle": Arm("the recipe trained on only the truly clean images with their true labels (the ceiling)", {}),
    "recipe-no_noise": Arm("recipe without the noise stage (every image, weight 1)", {"noise.enabled": False}),
    "recipe-no_regulariser": Arm("recipe without the L2 pull toward the pretrained weights",
                                 {"finetune.reg_lambda": 0}),
    "recipe-no_prior": Arm("recipe without prior correction (no logit adjustment in training, raw argmax)",
                           {"prior_correction": False}),
    "recipe-no_warmup": Arm("recipe without head warmup (the head starts at zero)", {"warmup.epochs": 0}),
    "recipe-no_validation": Arm("recipe trained on every image: no validation split held out, no estimate "
                                "(what holding them out costs)", {"validation.per_class": 0}),
    "recipe-v1": Arm("the previous default: native input size, rank-8 LoRA on q v out fc proj of the last 4 "
                     "blocks, GCE, no averaging, lr 2e-3, batch 64, 4 epochs", RECIPE_V1),
    "recipe-native_res": Arm("recipe at the backbone's native input size (no resolution increase)",
                             {"input.image_size": "native"}),
    "recipe-no_ema": Arm("recipe without weight averaging (the last step's weights)", {"finetune.ema_decay": 0}),
    "recipe-gce": Arm("recipe with GCE instead of CE + label smoothing", {"finetune.loss": "gce"}),
    "recipe-ce_no_ls": Arm("recipe with CE without label smoothing", {"finetune.label_smoothing": 0}),
    "recipe-mixup": Arm("recipe with mixup (alpha 0.2)", {"finetune.mixup_alpha": 0.2}),
    "recipe-proxy_lr": Arm("recipe with the proxy backbone's own learning rate (LoRA 2e-3, the previous default, "
                           "picked on the proxy): measures where the proxy and real CLIP disagree, not a default",
                           {"finetune.lr": 0.002}),
    "recipe-tta_flip": Arm("the recipe's model (same seed, not retrained) with --tta flip: logits averaged with "
                           "the mirror image's", {"infer.tta": "flip"}, model_of="recipe"),
    "recipe-tta_multiscale": Arm("the recipe's model (same seed, not retrained) with --tta multiscale: logits "
                                 "averaged over infer.tta_scales x the trained size, each with its mirror",
                                 {"infer.tta": "multiscale"}, model_of="recipe"),
    "recipe-test_prior": Arm("the recipe's model (same seed, not retrained) with --balance-test-prior: a class "
                             "bias fitted on the test logits (a rule risk)", {"infer.balance_test_prior": True},
                             model_of="recipe"),
}
BASELINES = ["linear_probe_ce", "full_ft_ce", "lora_ce"]
MARKERS = ("<!-- bench_results.md: begin -->", "<!-- bench_results.md: end -->")
SUMMARY_FILES = ("bench_results.json", "bench_results.md", "bench_results.png", "bench_estimate.png")
ESTIMATES = ("estimated_test_top1", "estimated_test_top1_interval95", "noisy_split_top1")
MIN_MODELS_FOR_AGREEMENT = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="dataset root with train/, test/, test_labels.csv, train_truth.csv (default: the proxy "
                        "benchmark); the four options below override its parts")
    p.add_argument("--train", help="train folder (default DATA/train)")
    p.add_argument("--test", help="test folder (default DATA/test)")
    p.add_argument("--test-labels", help="CSV image,label of the test folder (default DATA/test_labels.csv)")
    p.add_argument("--truth", help="CSV path,given_label,true_label,noise of the train images, for "
                                   "clean_oracle (default DATA/train_truth.csv if present)")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                   help="backbone weights file, or 'openai' for open_clip's official ViT-B-32 (default: the proxy)")
    p.add_argument("--allow-nonstandard-backbone", action="store_true",
                   help="weights other than OpenAI's ViT-B/32 files (tests; the default proxy is always allowed)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="the config profile every arm starts from (default: the proxy profile "
                        "configs/proxy-cpu.yaml; app/defaults.yaml is the contest default for real CLIP)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (>= 2 report mean and spread)")
    p.add_argument("--out", default="outputs/bench", help="output folder")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every arm (e.g. fewer epochs for a quick look)")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: summarise the runs that have finished (e.g. while a bench is running)")
    p.add_argument("--publish", metavar="DIR",
                   help="also copy bench_results.{json,md,png} and bench_estimate.png into DIR (a folder kept in git, "
                        "while the runs and models stay in --out); --update-report then links the charts there")
    p.add_argument("--update-report", metavar="MD_FILE",
                   help=f"copy bench_results.md into this file between the lines {MARKERS[0]} and {MARKERS[1]}")


def _paths(args) -> dict:
    data = Path(args.data)
    truth = Path(args.truth) if args.truth else data / "train_truth.csv"
    p = {"train": Path(args.train or data / "train"), "test": Path(args.test or data / "test"),
         "test_labels": Path(args.test_labels or data / "test_labels.csv"),
         "truth": truth if truth.is_file() else None}
    p["config"] = Path(args.config).resolve()     # the runs start in ROOT
    for key in ("train", "test", "test_labels", "config"):
        if not p[key].exists():
            raise FileNotFoundError(f"bench: {key} not found: {p[key]}")
    return p


def oracle_train_dir(train_dir: Path, truth_csv: Path, out: Path) -> Path:
    """A train folder of symlinks: only the truly clean images, each under its true class. Every
    class folder of the real train folder exists, so the class list is the same."""
    target = out / "oracle_train"
    if target.exists():
        return target
    truth = pd.read_csv(truth_csv, dtype=str)
    clean = truth[truth["noise"] == "clean"]
    tmp = out / "oracle_train.tmp"
    for c in sorted(p.name for p in train_dir.iterdir() if p.is_dir()):
        (tmp / c).mkdir(parents=True, exist_ok=True)
    for rel, label in zip(clean["path"], clean["true_label"]):
        src = truth_csv.parent / rel
        (tmp / label / Path(rel).name).symlink_to(src.resolve())
    tmp.rename(target)
    return target


def score(submission: Path, labels: pd.DataFrame, tail: set) -> dict:
    pred = pd.read_csv(submission, header=None, names=["image", "pred"], dtype=str, skipinitialspace=True)
    m = labels.merge(pred, on="image", how="left")
    m["correct"] = m["pred"] == m["label"]
    per_class = m.groupby("label")["correct"].mean()
    return {"top1": float(m["correct"].mean()), "macro": float(per_class.mean()),
            "tail_third": float(per_class[per_class.index.isin(tail)].mean()),
            "missing_rows": int(m["pred"].isna().sum())}


def _run(cmd, log_file: Path, env) -> float:
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"bench: `{' '.join(map(str, cmd))}` failed ({proc.returncode}):\n{tail}")
    return time.perf_counter() - t0


def override_sets(overrides: dict) -> list[str]:
    """`--set key=value` strings that give exactly these values: each value written as YAML, which is
    how --set reads it (str(3e-5) is '3e-05', a string to YAML, whose floats need '3.0e-05')."""
    def as_yaml(value) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).removesuffix("...\n").strip()
    return [f"{key}={as_yaml(value)}" for key, value in overrides.items()]


def _reusable(result: Path, model: Path) -> bool:
    """A finished run is reused unless the model it scored was trained again after it (infer-only arms)."""
    return result.is_file() and not (model.is_file() and model.stat().st_mtime_ns > result.stat().st_mtime_ns)


def run_arm(arm: str, seed: int, paths: dict, args, labels, tail, cache: Path, out: Path) -> dict:
    spec = ARMS[arm]
    run_dir = out / arm / f"seed{seed}"
    model_dir = out / spec.model_of / f"seed{seed}" if spec.model_of else run_dir
    model = model_dir / "model.pt"
    if _reusable(run_dir / "result.json", model):     # estimates read afresh: runs older than them have none
        return {**json.loads((run_dir / "result.json").read_text()), **training_estimates(model_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    train_dir = paths["train"]
    if arm == "clean_oracle":
        train_dir = oracle_train_dir(paths["train"], paths["truth"], out)
    # the profile first, the arm's own overrides last: they define the arm
    sets = [f"features.cache_dir={cache}", *args.set, *override_sets(spec.overrides)]
    config_args = ["--config", str(paths["config"])] + [a for s in sets for a in ("--set", s)]
    weights = [] if args.weights == "openai" else ["--weights", args.weights]
    if args.allow_nonstandard_backbone or (
            args.weights != "openai" and Path(args.weights).resolve() == DEFAULT_WEIGHTS.resolve()):
        weights.append("--allow-nonstandard-backbone")     # the proxy: a benchmark-only backbone
    env = dict(os.environ, PYTHON=sys.executable)
    if spec.model_of:
        if not model.is_file():
            raise RuntimeError(f"bench: {arm} infers with the model of {spec.model_of}, seed {seed}: "
                               f"{model} does not exist")
        print(f"bench: {arm} seed {seed}: inference only, with {model} (not retrained)", file=sys.stderr)
        train_s = 0.0
    elif model.is_file() and (run_dir / "train_report.json").is_file():
        train_s = None   # trained by an interrupted bench (the model file is written last): infer only
    else:
        train_s = _run([str(ROOT / "run_train.sh"), str(train_dir), str(run_dir), *weights, "--seed", str(seed),
                        *config_args], run_dir / "train.log", env)
    infer_s = _run([str(ROOT / "run_infer.sh"), str(paths["test"]), str(run_dir), "--model", str(model),
                    *config_args], run_dir / "infer.log", env)
    train_rep = json.loads((model_dir / "train_report.json").read_text())    # the model's training
    infer_rep = json.loads((run_dir / "infer_report.json").read_text())
    trained = {} if spec.model_of else train_rep       # what this arm's own run trained
    result = {"arm": arm, "seed": seed, **score(run_dir / "submission.csv", labels, tail),
              "train_seconds": round(train_rep["total_seconds"] if train_s is None else train_s, 1),
              "infer_seconds": round(infer_s, 1),
              "stage_seconds": {**trained.get("stage_seconds", {}), "infer": infer_rep["seconds"]},
              "peak_rss_gib": max(trained.get("peak_rss_gib", 0.0), infer_rep["peak_rss_gib"]),
              "model": model.relative_to(out).as_posix(), "trained_on": train_rep["images"]["trained_on"],
              **training_estimates(model_dir),
              "overrides": spec.overrides,
              "backbone_sha256": train_rep["backbone"]["sha256"], "code_version": train_rep["code_version"]}
    write_json(run_dir / "result.json", result)
    return result


def training_estimates(model_dir: Path) -> dict:
    """The model's own estimate of its test top-1 and the noisy split's top-1, from its training
    report (None where the run held out no validation split)."""
    report = json.loads((model_dir / "train_report.json").read_text())
    return {key: report.get(key) for key in ESTIMATES}


def models_with_estimates(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that trained their own model and held out a validation split (an infer-only arm reuses
    another arm's model and estimate: one point per model)."""
    trained = runs[[ARMS[a].model_of is None for a in runs["arm"]]]
    return trained[trained["estimated_test_top1"].notna()] if "estimated_test_top1" in trained else trained[:0]


def estimate_agreement(runs: pd.DataFrame) -> dict | None:
    """How well each training-time figure predicts the measured test top-1 over the trained models:
    Spearman rank correlation, mean absolute error and mean signed error (points). None under
    MIN_MODELS_FOR_AGREEMENT models."""
    trained = models_with_estimates(runs)
    if len(trained) < MIN_MODELS_FOR_AGREEMENT:
        return None
    return {"models": len(trained), **{figure: agreement(trained[figure], trained["top1"])
                                       for figure in ("estimated_test_top1", "noisy_split_top1")}}


def agreement(predicted: pd.Series, reference: pd.Series) -> dict:
    """Spearman rank correlation, mean absolute and mean signed error (points) of `predicted`
    top-1 figures against `reference` ones (fractions)."""
    predicted, reference = predicted.astype(float), reference.astype(float)
    error = 100 * (predicted - reference)
    rho = predicted.rank().corr(reference.rank())     # Spearman: Pearson on (average) ranks
    return {"spearman": None if pd.isna(rho) else round(float(rho), 3),
            "mae_points": round(float(error.abs().mean()), 2), "mean_error_points": round(float(error.mean()), 2)}


def dataset_stats(paths: dict, labels: pd.DataFrame) -> tuple[dict, set]:
    counts = pd.Series({p.name: sum(1 for f in p.iterdir() if f.is_file())
                        for p in sorted(paths["train"].iterdir()) if p.is_dir()})
    tail = set(counts.sort_values(kind="stable").index[: max(1, len(counts) // 3)])
    stats = {"train_dir": str(paths["train"]), "classes": len(counts), "train_files": int(counts.sum()),
             "per_class_max_median_min": [int(counts.max()), float(counts.median()), int(counts.min())],
             "tail_third_classes": len(tail), "test_dir": str(paths["test"]), "test_images": len(labels)}
    if paths["truth"] is not None:
        truth = pd.read_csv(paths["truth"], dtype=str)
        stats["noise"] = truth["noise"].value_counts().to_dict()
    return stats, tail


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Per arm: mean and spread (sample std over seeds) of each metric, the mean training-time
    estimate and noisy-split top-1 (NaN where runs have none); the recipe's margins over the baselines."""
    runs = runs.assign(**{key: pd.to_numeric(runs[key], errors="coerce") if key in runs else float("nan")
                          for key in ("estimated_test_top1", "noisy_split_top1")})
    agg = runs.groupby("arm", sort=False).agg(
        seeds=("seed", "count"), top1=("top1", "mean"), top1_sd=("top1", "std"),
        estimate=("estimated_test_top1", "mean"), noisy_split=("noisy_split_top1", "mean"), macro=("macro", "mean"),
        macro_sd=("macro", "std"), tail_third=("tail_third", "mean"), train_seconds=("train_seconds", "mean"),
        infer_seconds=("infer_seconds", "mean"), peak_rss_gib=("peak_rss_gib", "max"))
    agg = agg.fillna({column: 0.0 for column in agg.columns if column not in ("estimate", "noisy_split")})
    top1 = agg["top1"]
    claims = {}
    if "recipe" in top1:
        base = [b for b in BASELINES if b in top1]
        if base:
            best = max(base, key=lambda b: top1[b])
            claims["best_baseline"] = best
            claims["recipe_minus_best_baseline"] = float(top1["recipe"] - top1[best])
        if "clean_oracle" in top1:
            for ref in dict.fromkeys(r for r in ("full_ft_ce", claims.get("best_baseline")) if r):  # fixed order
                if ref in top1 and top1["clean_oracle"] != top1[ref]:
                    claims[f"gap_closed_vs_{ref}"] = float(
                        (top1["recipe"] - top1[ref]) / (top1["clean_oracle"] - top1[ref]))
    return agg, claims


def write_markdown(path: Path, agg: pd.DataFrame, claims: dict, meta: dict, agreement: dict | None = None) -> None:
    def pct(mean, sd, n):
        return f"{100 * mean:.1f} ± {100 * sd:.1f}" if n > 1 else f"{100 * mean:.1f}"

    def maybe(value):
        return "–" if pd.isna(value) else f"{100 * value:.1f}"
    lines = [f"Dataset `{meta['dataset']['train_dir']}`: {meta['dataset']['classes']} classes, "
             f"{meta['dataset']['train_files']} train files (per class max/median/min "
             f"{'/'.join(str(x) for x in meta['dataset']['per_class_max_median_min'])}), "
             f"{meta['dataset']['test_images']} test images. Backbone `{meta['weights']}` "
             f"(SHA-256 {meta['backbone_sha256'][:16]}...), config `{meta['config']}` + each arm's overrides, "
             f"seeds {meta['seeds']}, code of the runs "
             f"{', '.join(meta['run_code_versions'])}, "
             f"machine: {meta['machine']}. Time per seed (train + infer wall time of its runs, summed): "
             + ", ".join(f"seed {k}: {v:.0f} min" for k, v in meta["minutes_per_seed"].items()) + ".", "",
             "| arm | seeds | top-1 % | estimate % | noisy split % | macro % | tail-third % | train s | infer s | "
             "peak GiB | what it is |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, r in agg.iterrows():
        lines.append(f"| `{arm}` | {r.seeds:.0f} | {pct(r.top1, r.top1_sd, r.seeds)} | {maybe(r.estimate)} | "
                     f"{maybe(r.noisy_split)} | {pct(r.macro, r.macro_sd, r.seeds)} | "
                     f"{100 * r.tail_third:.1f} | {r.train_seconds:.0f} | {r.infer_seconds:.0f} | "
                     f"{r.peak_rss_gib:.2f} | {ARMS[arm].what} |")
    lines.append("")
    if "recipe_minus_best_baseline" in claims:
        lines.append(f"- recipe minus the best baseline (`{claims['best_baseline']}`): "
                     f"{100 * claims['recipe_minus_best_baseline']:+.1f} points of top-1.")
    for key, value in claims.items():
        if key.startswith("gap_closed_vs_"):
            lines.append(f"- share of the gap between `{key[len('gap_closed_vs_'):]}` and `clean_oracle` "
                         f"that the recipe closes: {100 * value:.0f}%.")
    if agreement:
        est, noisy = agreement["estimated_test_top1"], agreement["noisy_split_top1"]
        lines.append(f"- against the measured top-1 over {agreement['models']} trained models (arms x seeds): the "
                     f"estimate's Spearman rank correlation {est['spearman']}, mean absolute error "
                     f"{est['mae_points']:.1f} points (mean error {est['mean_error_points']:+.1f}); the noisy "
                     f"split's {noisy['spearman']}, {noisy['mae_points']:.1f} points "
                     f"({noisy['mean_error_points']:+.1f}).")
    lines.append("- mean ± sample standard deviation over the seeds; tail third = the third of the classes "
                 "with the fewest train files; estimate = the training run's estimated test top-1 (a split "
                 "held out of training, weighted by the noise stage's clean scores), noisy split = the same "
                 "images' plain top-1 against their noisy labels, both means over the seeds (an infer-only arm shows its model's).")
    path.write_text("\n".join(lines) + "\n")


def update_report(report_md: Path, results_md: Path, png: Path, estimate_png: Path | None = None) -> None:
    """Replace the text between the MARKERS lines of report_md with results_md (+ the charts)."""
    text = report_md.read_text()
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start < 0 or end < start:
        raise ValueError(f"{report_md}: no {MARKERS[0]} ... {MARKERS[1]} block to fill")
    rel = os.path.relpath(png, report_md.parent)
    block = f"{MARKERS[0]}\n{results_md.read_text()}\n![test top-1 by arm]({rel})\n"
    if estimate_png is not None and estimate_png.is_file():
        block += (f"\n![estimated against measured test top-1]"
                  f"({os.path.relpath(estimate_png, report_md.parent)})\n")
    report_md.write_text(text[:start] + block + text[end:])


def plot(agg: pd.DataFrame, out_png: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colour = {**{b: "0.6" for b in BASELINES}, "recipe": "tab:green", "clean_oracle": "tab:blue"}
    fig, ax = plt.subplots(figsize=(1.1 * len(agg) + 2, 4))
    ax.bar(range(len(agg)), 100 * agg["top1"], yerr=100 * agg["top1_sd"], capsize=3,
           color=[colour.get(a, "tab:olive") for a in agg.index])
    for i, v in enumerate(agg["top1"]):
        ax.text(i, 100 * v + 0.5, f"{100 * v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(agg)), agg.index, rotation=30, ha="right")
    ax.set(ylabel="test top-1 %", title=title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_estimates(runs: pd.DataFrame, out_png: Path, title: str) -> bool:
    """Scatter of each trained model's estimated test top-1 (95% interval) and noisy-split top-1
    against its measured test top-1, with the diagonal. False (nothing drawn) without estimates."""
    trained = models_with_estimates(runs)
    if trained.empty:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    measured, estimate = 100 * trained["top1"].astype(float), 100 * trained["estimated_test_top1"].astype(float)
    low, high = (100 * trained["estimated_test_top1_interval95"].map(lambda iv: iv[i]) for i in (0, 1))
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.errorbar(measured, estimate, yerr=[estimate - low, high - estimate], fmt="o", color="tab:green", capsize=3,
                label="estimated test top-1 (95% interval)")
    ax.scatter(measured, 100 * trained["noisy_split_top1"].astype(float), marker="s", color="tab:red",
               label="noisy-label split top-1 (plain)")
    for x, y, arm in zip(measured, estimate, trained["arm"]):
        ax.annotate(arm, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ends = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(ends, ends, color="0.5", ls="--", lw=1, label="estimate = measured")
    ax.set(xlabel="measured test top-1 %", ylabel="training-time figure %", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def _machine() -> str:
    cpu = cpu_name()
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001
        gpu = "?"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}"


def with_models(arms: list[str]) -> list[str]:
    """The arms in order, each infer-only arm preceded by the arm whose model it infers (added when
    not asked for: its model is trained, scored and reported like any arm)."""
    ordered = []
    for arm in arms:
        source = ARMS[arm].model_of
        if source and source not in ordered:
            if source not in arms:
                print(f"bench: {arm} infers with the model of {source}: {source} added", file=sys.stderr)
            ordered.append(source)
        if arm not in ordered:
            ordered.append(arm)
    return ordered


def run(args) -> dict:
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
    arms = with_models(arms)
    paths = _paths(args)
    if "clean_oracle" in arms and paths["truth"] is None:
        print("bench: no truth file, clean_oracle skipped", file=sys.stderr)
        arms.remove("clean_oracle")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = pd.read_csv(paths["test_labels"], dtype=str)[["image", "label"]]
    stats, tail = dataset_stats(paths, labels)
    t0 = time.perf_counter()
    results = []
    jobs = [(arm, seed) for seed in args.seeds for arm in arms]
    bar = tqdm(jobs, desc="bench", unit="run")
    for arm, seed in bar:
        bar.set_postfix_str(f"{arm} seed {seed}")
        if args.finished_only and not (out / arm / f"seed{seed}" / "result.json").is_file():
            continue
        results.append(run_arm(arm, seed, paths, args, labels, tail, out / "cache", out))
        write_json(out / "bench_runs.partial.json", results)
    if not results:
        raise ValueError(f"bench: no finished runs in {out}")
    runs = pd.DataFrame(results)
    agg, claims = summarise(runs)
    agg = agg.loc[[a for a in arms if a in agg.index]]
    config = paths["config"]
    meta = {"dataset": stats, "weights": args.weights,
            "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
            "backbone_sha256": results[0]["backbone_sha256"],
            "seeds": args.seeds, "code_version": code_version(), "machine": _machine(),
            "run_code_versions": sorted(runs["code_version"].unique()),
            "extra_overrides": args.set, "wall_seconds": round(time.perf_counter() - t0, 1),
            "minutes_per_seed": {int(k): round(v / 60, 1) for k, v in
                                 runs.assign(t=runs["train_seconds"] + runs["infer_seconds"]).groupby("seed")["t"].sum().items()}}
    agreement = estimate_agreement(runs)
    report = {**meta, "arms": {a: ARMS[a].what for a in arms}, "summary": agg.reset_index().to_dict("records"),
              "claims": claims, "estimate_agreement": agreement, "runs": results}
    write_json(out / "bench_results.json", report)
    write_markdown(out / "bench_results.md", agg, claims, meta, agreement)
    dataset = Path(stats["train_dir"]).parent.name
    plot(agg, out / "bench_results.png", f"{dataset}: test top-1 by arm")
    if not plot_estimates(runs, out / "bench_estimate.png", f"{dataset}: estimated vs measured test top-1"):
        (out / "bench_estimate.png").unlink(missing_ok=True)         # an older bench's, no longer true
    (out / "bench_runs.partial.json").unlink(missing_ok=True)
    summary_dir = out
    if args.publish:
        summary_dir = Path(args.publish)
        summary_dir.mkdir(parents=True, exist_ok=True)
        for name in SUMMARY_FILES:
            if (out / name).is_file():
                shutil.copy2(out / name, summary_dir / name)
            else:
                (summary_dir / name).unlink(missing_ok=True)
    if args.update_report:
        update_report(Path(args.update_report), summary_dir / "bench_results.md", summary_dir / "bench_results.png",
                      summary_dir / "bench_estimate.png")
    print((out / "bench_results.md").read_text())
    return report
