"""Choose settings on your own data: every combination of a grid is an ordinary training run, ranked on
the validation split they all share.

    python -m app sweep TRAIN_DIR OUT_ROOT --grid finetune.lr=2e-4,5e-4,1e-3 [--grid lora.rank=16,32]
                        [--max-runs 12] [--split-images 1500]
                        [any run_train.sh option: --config, --set, --weights, --seed...]

- Each combination trains through run_train.sh (every GPU), with the same seed, hence the same
  validation split, in OUT_ROOT/<key=value,...>/. The split holds out --split-images images
  (default 1,500) spread evenly over the classes: the fewest a class that make that many, each class
  giving at most half of its own; a paired interval's width goes with the number of held-out images,
  not their share. Where a training run's split already holds that many (3% of the images, up to 3 a
  class) it is kept, and the sweep's runs are the runs a submission would train. best.yaml leaves
  the split to the default, so the pick retrains on all but 3%. A split given in the options (--set
  or --config validation.*) is kept as is; --split-images 0 keeps a training run's.
- Shared work once: the scan, the frozen features, the noise stage and the head warmup are stored in
  OUT_ROOT/shared/ keyed by the settings feeding each (config shared_dir, app/sweep/shared.py), and
  reused by every run whose settings upstream are the same.
- Resumable: run the same command again; finished runs are skipped, the interrupted one resumes.
- The answer: OUT_ROOT/sweep.md, sweep.json, sweep.png (each run's estimate, its paired difference
  from the best with a 95% interval, per-epoch estimates), OUT_ROOT/best.yaml (the recommended run's
  settings as a --config file) and the command reproducing it. Where the best run's interval against
  others includes 0 they are "not separable", and the recommendation among them is the default
  (app/defaults.yaml under your --config/--set) when it is one of them, else the best estimate.
- Refused before any work: an unknown key, a value of the wrong type, a key that moves the
  validation split or the shared folders, or more runs than --max-runs.
"""
import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..config import ConfigError, defaults, from_args, load_config
from ..scan import empty_files, list_train_files

ROOT = Path(__file__).resolve().parent.parent.parent
RUN_FILE = "sweep_run.json"       # in each run's folder: the options it was launched with
# keys a sweep cannot vary: they change the validation split (runs could not be paired), the weights
# (one backbone per contest), or where the shared stages live
FIXED = {"seed": "it draws the validation split: runs of different seeds cannot be paired",
         "validation": "it draws the validation split: runs of different splits cannot be paired",
         "backbone": "one backbone: pass --weights once for every run",
         "shared_dir": "the sweep sets it (OUT_ROOT/shared)",
         "features.cache_dir": "a folder, not a setting"}
# the sweep's split: this many held-out images, each class giving at most MAX_SPLIT_SHARE of its own.
# Proxy, reduced budget (TECH_REPORT 4.7; bench/sweep_study.sh): a paired interval's half-width against
# the best was 50 to 100 points / sqrt(split images) on both proxy sets (102 to 1,531 images). With
# 1,500 (1,531 images on the hard variant, 1,504 on flowers102-noisy) the pick, retrained with a
# training run's split, was within 1 dev-test point of the grid's best on both; at 3% (102 images)
# and at 15% it was so on one set only
SPLIT_IMAGES = 1500
MAX_SPLIT_SHARE = 0.5
# train options that set a config key (python -m app train --help): a grid key may not be set by one too
OPTION_KEYS = {"epochs": "finetune.epochs", "image_size": "input.image_size", "precision": "precision",
               "num_workers": "num_workers"}


def add_arguments(p) -> None:
    p.add_argument("train_dir", type=Path)
    p.add_argument("out_root", type=Path)
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="values of one config key to try (repeatable: every combination is a run)")
    p.add_argument("--max-runs", type=int, default=12, help="refuse a grid of more runs than this (default 12)")
    p.add_argument("--split-images", type=int, default=SPLIT_IMAGES,
                   help=f"how many images every run holds out for the validation split, spread evenly over "
                        f"the classes, each giving at most {100 * MAX_SPLIT_SHARE:g}%% of its own (default "
                        f"{SPLIT_IMAGES}; a training run's split where it holds as many; 0: a training run's "
                        f"split; validation.* given by --set or --config wins)")
    p.add_argument("train_options", nargs=argparse.REMAINDER,
                   help="run_train.sh options given to every run (python -m app train --help)")


def _split_values(text: str) -> list[str]:
    """V1,V2,... split at the commas outside brackets (a list value: lora.targets=[q,v],[q,k,v,out])."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_grid(items: list[str]) -> dict[str, list[tuple[str, object]]]:
    """{key: [(value as typed, value as the config reads it), ...]} of the --grid items; a ValueError
    naming the item for a key the sweep cannot vary, a key or a value given twice, and whatever
    app/config.py refuses (an unknown key with the nearest known ones, a value of the wrong type or
    out of its range)."""
    if not items:
        raise ValueError("sweep: no --grid given (e.g. --grid finetune.lr=2e-4,5e-4,1e-3)")
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ValueError(f"--grid {item}: expected SECTION.KEY=V1,V2,...")
        why = next((w for fixed, w in FIXED.items() if key == fixed or key.startswith(fixed + ".")), None)
        if why:
            raise ValueError(f"--grid {item}: {key} cannot be swept: {why}")
        if key in grid:
            raise ValueError(f"--grid {item}: {key} is given twice; give its values in one --grid")
        parsed = []
        for text in _split_values(values):
            try:                          # the settings' own check: the key, the value's type and range
                value = lookup(load_config(None, None, [f"{key}={text}"]), key)
            except ConfigError as e:
                raise ConfigError(f"--grid {item}: {e}") from None
            if any(value == v for _, v in parsed):
                raise ValueError(f"--grid {item}: the value {text!r} is given twice")
            parsed.append((text, value))
        grid[key] = parsed
    return grid


def lookup(cfg: dict, key: str):
    """cfg["a"]["b"] of the dotted key "a.b"."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def run_name(combo: dict[str, tuple[str, object]]) -> str:
    """A run's folder name: key=value as typed, joined by commas (finetune.lr=5e-4,lora.rank=16)."""
    return ",".join(f"{k}={text.replace('/', '_').replace(' ', '')}" for k, (text, _) in combo.items())


def plan(grid: dict) -> list[dict]:
    """Every combination: {"name", "settings": {key: value}, "sets": ["key=text", ...]}."""
    runs = []
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values))
        runs.append({"name": run_name(combo), "settings": {k: v for k, (_, v) in combo.items()},
                     "sets": [f"{k}={text}" for k, (text, _) in combo.items()]})
    return runs


def split_options(argv: list[str]) -> tuple[list[str], list[int], list[int], list[str]]:
    """(--grid items, --max-runs values, --split-images values, the rest) of the options after
    TRAIN_DIR OUT_ROOT."""
    own = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    own.add_argument("--grid", action="append", default=[])
    own.add_argument("--max-runs", action="append", type=int, default=[])
    own.add_argument("--split-images", action="append", type=int, default=[])
    try:
        known, rest = own.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(f"sweep: {e}") from None
    return known.grid, known.max_runs, known.split_images, rest


def check_train_options(train_dir, out_root, options: list[str]) -> argparse.Namespace:
    """The run_train.sh options as `python -m app train` parses them; a ValueError for --resume (the
    sweep resumes by itself) or anything train refuses."""
    from ..__main__ import parser
    args, unknown = parser().parse_known_args(["train", str(train_dir), str(out_root), *options])
    if unknown:
        raise ValueError(f"sweep: not a --grid, --max-runs, --split-images or run_train.sh option: {' '.join(unknown)} "
                         f"(python -m app train --help)")
    if args.resume:
        raise ValueError("sweep: --resume is not a sweep option: run the same sweep command again to resume it")
    return args


def prepare_sweep(train_dir: Path, out_root: Path, grid_items: list[str], max_runs: int,
                  options: list[str], split_images: int = SPLIT_IMAGES) -> tuple[list[dict], argparse.Namespace]:
    """Everything checked before any work: the grid, the options, the split's cap, the config of every
    run, and the run folders already in OUT_ROOT. Returns the runs (each with its command and state)
    and the parsed train options."""
    grid = parse_grid(grid_items)
    if split_images < 0:
        raise ValueError(f"--split-images {split_images}: expected a number of images, 0 or more (0: a training "
                         "run's split)")
    total = 1
    for values in grid.values():
        total *= len(values)
    if total > max_runs:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in grid.items())
        raise ValueError(f"--grid: {sizes} = {total} runs, more than --max-runs {max_runs}: fewer values, "
                         f"or --max-runs {total} if you mean it")
    args = check_train_options(train_dir, out_root, options)
    for item in args.set:
        if "=" in item and item.split("=", 1)[0].strip() in grid:
            raise ValueError(f"sweep: --set {item} sets a key the grid varies")
    for dest, key in OPTION_KEYS.items():
        if getattr(args, dest) is not None and key in grid:
            raise ValueError(f"sweep: --{dest.replace('_', '-')} sets {key}, which the grid varies")
    runs = plan(grid)
    own_validation = from_args(args)["validation"]              # --set, --config, submission.yaml
    classes, files = list_train_files(train_dir)                     # also: refuses a folder without files
    labels = files.loc[~empty_files(files), "label"].to_numpy()
    split = [] if own_validation != defaults()["validation"] else split_settings(labels, len(classes), split_images)
    shared = f"shared_dir={Path(out_root).resolve() / 'shared'}"
    for r in runs:                                                   # every run's config is valid
        settings_with(args, [*split, *r["sets"]])
        r["dir"] = Path(out_root) / r["name"]
        r["command"] = [*options, *[x for s in [*split, *r["sets"]] for x in ("--set", s)], "--set", shared]
        r["split"] = split
        r["state"] = run_state(r, own_validation)
    return runs, args


def split_settings(labels: np.ndarray, num_classes: int, images: int) -> list[str]:
    """The sweep's split as --set items, from the training files' class `labels`: the fewest images a
    class (per_class) that make at least `images` in all, each class giving at most MAX_SPLIT_SHARE of
    its own (so at most that share of all; fewer than `images` where the classes cannot give them).
    None for 0, or where a training run's split already holds `images` (its runs are then the runs a
    submission would train)."""
    from ..validation import per_class_counts
    if images == 0 or per_class_counts(labels, num_classes, defaults()["validation"]).sum() >= images:
        return []
    caps = np.floor(MAX_SPLIT_SHARE * np.bincount(labels, minlength=num_classes)).astype(int)
    held = np.array([np.minimum(k, caps).sum() for k in range(1, min(caps.max(), images) + 1)])   # by per_class
    if not len(held):                                   # no class can give an image
        return []
    per_class = min(int(np.searchsorted(held, images)), len(held) - 1) + 1
    return [f"validation.max_fraction={MAX_SPLIT_SHARE:g}", f"validation.per_class={per_class}",
            f"validation.max_class_share={MAX_SPLIT_SHARE:g}"]


def settings_with(args: argparse.Namespace, sets: list[str]) -> dict:
    """The resolved settings of the parsed train options `args` with `sets` after their own --set."""
    return from_args(argparse.Namespace(**{**vars(args), "set": [*args.set, *sets]}))


def settings_of(command: list[str]) -> dict:
    """The resolved settings of a run's options: the same run however its options were spelled (an
    absolute weights path as the file it names: /a/b/../w.pt is /a/w.pt)."""
    cfg = from_args(check_train_options("TRAIN_DIR", "OUT_DIR", command))
    weights = cfg["backbone"]["weights"]
    if weights and os.path.isabs(weights):
        cfg["backbone"]["weights"] = os.path.realpath(weights)
    return cfg


def run_state(run: dict, own_validation: dict) -> str:
    """'finished', 'resume' (started with these options), or 'new'; a ValueError when the folder holds
    a run of other options (it is not overwritten), naming the --set items that continue it when only
    its split differs. `own_validation`: the validation settings of the options without the sweep's
    split (what the split is once any validation.* is given)."""
    from ..finetune import latest_checkpoint
    folder = run["dir"]
    record = folder / RUN_FILE
    if not folder.exists() or not any(folder.iterdir()):
        return "new"
    if not record.is_file():
        raise ValueError(f"sweep: {folder} exists and is not a run of this sweep: choose another OUT_ROOT")
    before = json.loads(record.read_text())["command"]
    was, now = (settings_of(before), settings_of(run["command"])) if before != run["command"] else ({}, {})
    if was != now:
        split = [f"--set validation.{k}={v}" for k, v in was["validation"].items() if v != own_validation[k]]
        why = (f"; only its validation split differs: give the sweep {' '.join(split) or '--split-images 0'} "
               "to continue it" if {**was, "validation": None} == {**now, "validation": None} else "")
        raise ValueError(f"sweep: {folder} was trained with other options ({' '.join(before)}), not "
                         f"({' '.join(run['command'])}): choose another OUT_ROOT, or remove that folder{why}")
    if (folder / "model.pt").is_file() and (folder / "train_report.json").is_file():
        return "finished"
    return "resume" if latest_checkpoint(folder / "checkpoints") else "new"


def launch(train_dir: Path, run: dict) -> int:
    """One training run through run_train.sh (one process per GPU); its output goes to the run's
    train.log. Returns its exit status."""
    run["dir"].mkdir(parents=True, exist_ok=True)
    (run["dir"] / RUN_FILE).write_text(json.dumps({"name": run["name"], "command": run["command"]}, indent=2))
    command = ["bash", str(ROOT / "run_train.sh"), str(train_dir), str(run["dir"]), *run["command"]]
    if run["state"] == "resume":
        command.append("--resume")
    env = dict(os.environ, PYTHON=sys.executable)
    with open(run["dir"] / "train.log", "a") as log:
        # its own process group: a sweep interrupted (Ctrl-C, kill) stops the run and every process it started
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise


def run(args) -> None:
    grid_items, max_runs, split_images, options = split_options(args.train_options)
    grid_items = [*args.grid, *grid_items]
    max_runs = max_runs[-1] if max_runs else args.max_runs
    split_images = split_images[-1] if split_images else args.split_images
    runs, train_args = prepare_sweep(args.train_dir, args.out_root, grid_items, max_runs, options, split_images)
    t0 = time.perf_counter()
    args.out_root.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # `kill` stops the run in progress too
    try:
        for number, r in enumerate(runs, 1):
            print(f"sweep: run {number}/{len(runs)} {r['name']}: "
                  f"{'finished, skipped' if r['state'] == 'finished' else r['state'] + ' (log: ' + str(r['dir'] / 'train.log') + ')'}",
                  flush=True)
            if r["state"] == "finished":
                continue
            status = launch(args.train_dir, r)
            if status:
                tail = (r["dir"] / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise ValueError(f"sweep: run {r['name']} failed (exit {status}): {tail[0] if tail else ''}; "
                                 f"see {r['dir'] / 'train.log'}. Run the same command again to resume the sweep")
    finally:
        signal.signal(signal.SIGTERM, previous)
    from .answer import write_answer
    print(write_answer(args.train_dir, args.out_root, runs, train_args, options, time.perf_counter() - t0))
