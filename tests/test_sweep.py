"""`python -m app sweep`: the grid is parsed and refused before any work; the shared stages are keyed by
exactly the settings feeding them (a run with the same settings reuses them, a changed setting
recomputes its stage and those after it); a killed sweep run again resumes; the runs are ranked by
their paired differences, "not separable" ones resolved toward the default; a set too small for one
image a class still gets a split."""
import json
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from app.__main__ import main
from app.config import load_config
from app.finetune import FAIL_ENV
from app.sweep import check_train_options, parse_grid, plan, prepare_sweep, split_options, split_settings
from app.sweep.answer import recommend, write_answer
from app.sweep.shared import SharedStages, listing_digest
from app.validation import estimate_top1, per_class_counts, validation_split
from tests.conftest import FAST


def test_the_grid_is_parsed_with_the_configs_types():
    grid = parse_grid(["finetune.lr=2e-4, 1e-3", "lora.targets=[q,v],[q,k,v,out]", "noise.enabled=true,false",
                       "input.image_size=native,224"])
    assert grid["finetune.lr"] == [("2e-4", 2e-4), ("1e-3", 1e-3)]
    assert [v for _, v in grid["lora.targets"]] == [["q", "v"], ["q", "k", "v", "out"]]
    assert [v for _, v in grid["noise.enabled"]] == [True, False]
    assert [v for _, v in grid["input.image_size"]] == ["native", 224]
    runs = plan(parse_grid(["finetune.lr=5e-4,1e-3", "lora.rank=16,32"]))
    assert [r["name"] for r in runs] == ["finetune.lr=5e-4,lora.rank=16", "finetune.lr=5e-4,lora.rank=32",
                                         "finetune.lr=1e-3,lora.rank=16", "finetune.lr=1e-3,lora.rank=32"]
    assert runs[1]["settings"] == {"finetune.lr": 5e-4, "lora.rank": 32}
    assert runs[1]["sets"] == ["finetune.lr=5e-4", "lora.rank=32"]


@pytest.mark.parametrize("grid, message", [
    (["finetune.lrr=1e-3,2e-3"], "--grid finetune.lrr=1e-3,2e-3: unknown setting 'finetune.lrr' (did you mean "
                                 "finetune.lr?)"),
    (["finetune.epochs=2.5"], "--grid finetune.epochs=2.5: finetune.epochs=2.5: expected a valid integer"),
    (["noise.enabled=true,maybe"], 'noise.enabled="maybe": expected true or false'),
    (["finetune.lr=1e-3,0"], "finetune.lr=0: expected greater than 0"),
    (["seed=0,1"], "seed cannot be swept"),
    (["validation.per_class=1,3"], "validation.per_class cannot be swept"),
    (["finetune.lr=1e-3,0.001"], "given twice"),
    (["finetune.lr=1e-4,2e-4,5e-4,1e-3", "lora.rank=8,16,32,64"], "16 runs, more than --max-runs 12"),
])
def test_bad_grids_are_refused_before_any_work(tiny, tmp_path, capsys, grid, message):
    out = tmp_path / "sweep"
    argv = ["sweep", str(tiny / "train"), str(out), *[x for g in grid for x in ("--grid", g)],
            "--weights", str(tiny / "tiny_backbone.pt"), "--allow-nonstandard-backbone"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()                                   # nothing started


def test_options_that_collide_with_the_grid_are_refused(tiny, tmp_path):
    train = tiny / "train"
    with pytest.raises(ValueError, match="--set finetune.lr=1e-3 sets a key the grid varies"):
        prepare_sweep(train, tmp_path / "s", ["finetune.lr=1e-3,2e-3"], 12, ["--set", "finetune.lr=1e-3"])
    with pytest.raises(ValueError, match="--epochs sets finetune.epochs"):
        prepare_sweep(train, tmp_path / "s", ["finetune.epochs=1,2"], 12, ["--epochs", "3"])
    with pytest.raises(ValueError, match="not a --grid, --max-runs, --split-images or run_train.sh option: --bogus"):
        prepare_sweep(train, tmp_path / "s", ["finetune.lr=1e-3"], 12, ["--bogus"])
    with pytest.raises(ValueError, match="--resume is not a sweep option"):
        prepare_sweep(train, tmp_path / "s", ["finetune.lr=1e-3"], 12, ["--resume"])
    runs, _ = prepare_sweep(train, tmp_path / "s", ["finetune.lr=1e-3,2e-3"], 2, [])
    assert [r["state"] for r in runs] == ["new", "new"] and not (tmp_path / "s").exists()



def test_the_sweeps_split_holds_at_least_split_images_spread_over_the_classes_unless_the_options_set_it(tiny, tmp_path):
    train = tiny / "train"                          # 40 files: 14, 12 (one empty) and 14, a 4th folder empty
    assert split_options(["--split-images", "10", "--set", "a.b=1", "--grid", "finetune.lr=1e-3"]) == \
        (["finetune.lr=1e-3"], [], [10], ["--set", "a.b=1"])
    with pytest.raises(ValueError, match="sweep: argument --split-images: invalid int value: '0.2'"):
        split_options(["--split-images", "0.2"])

    from app.scan import empty_files, list_train_files
    classes, files = list_train_files(train)

    def held_out(split):                            # the split's size with these settings
        vcfg = load_config(None, None, split)["validation"]
        labels = files.loc[~empty_files(files), "label"].to_numpy()   # the scan skips the empty file
        return int(per_class_counts(labels, len(classes), vcfg).sum())

    runs, _ = prepare_sweep(train, tmp_path / "s", ["finetune.lr=1e-3,2e-3"], 2, [], split_images=10)
    split = ["validation.max_fraction=0.5", "validation.per_class=4", "validation.max_class_share=0.5"]
    assert all(r["command"][:6] == [x for s in split for x in ("--set", s)] and r["split"] == split for r in runs)
    assert held_out(split) == 12                    # the fewest a class that make 10: 4 + 4 + 4
    # the default 1,500: as many as the classes give, half of each (7 + 5 + 7 of 14, 11 and 14 images)
    runs, _ = prepare_sweep(train, tmp_path / "s", ["finetune.lr=1e-3"], 2, [])
    assert held_out(runs[0]["split"]) == 19 and runs[0]["split"][1] == "validation.per_class=7"
    assert prepare_sweep(train, tmp_path / "s", ["finetune.lr=1e-3"], 2, [], split_images=0)[0][0]["split"] == []
    # where a training run's split already holds as many images, it is kept (1,000 classes of 200 images
    # at 3 a class: 3,000), and few classes do not make it larger than asked (100 of 10,000: 15 a class)
    assert split_settings(np.repeat(np.arange(1000), 200), 1000, 1500) == []
    assert split_settings(np.repeat(np.arange(100), 10000), 100, 1500)[1] == "validation.per_class=15"
    # a split of the user's own, by --set or in a --config file, is kept as is: nothing added
    runs, _ = prepare_sweep(train, tmp_path / "s", ["finetune.lr=1e-3"], 2, ["--set", "validation.max_fraction=0.4"])
    assert runs[0]["split"] == [] and [x for x in runs[0]["command"] if x.startswith("validation.")] == \
        ["validation.max_fraction=0.4"]
    config = tmp_path / "mine.yaml"
    config.write_text("validation:\n  per_class: 1\n")
    assert prepare_sweep(train, tmp_path / "s", ["finetune.lr=1e-3"], 2, ["--config", str(config)])[0][0]["split"] == []
    with pytest.raises(ValueError, match="--split-images -1: expected a number of images, 0 or more"):
        prepare_sweep(train, tmp_path / "s", ["finetune.lr=1e-3"], 2, [], split_images=-1)
    assert not (tmp_path / "s").exists()


def test_stage_keys_follow_exactly_the_settings_upstream(tiny):
    from app.scan import list_train_files
    listing = list_train_files(tiny / "train")

    def keys(sets, listing=listing):
        cfg = load_config(None, None, sets)
        s = SharedStages("unused")
        s.key("scan", cfg, listing=listing_digest(listing))
        s.key("features", cfg, backbone_sha256="abc", cache_dir="c")
        s.key("noise", cfg)
        s.key("warmup", cfg, device="cpu")
        return s.keys

    base = keys([])
    assert keys([]) == base                                                  # deterministic
    assert keys(["finetune.lr=1e-3", "lora.rank=8", "infer.tau=0.5"]) == base   # downstream of every stage
    assert keys(["precision=bf16"]) == base           # the frozen pass runs in fp32 whatever the precision
    weights = keys(["noise.enabled=false"])       # the detector still runs for the estimate; the warmup's
    assert [weights[s] == base[s] for s in base] == [True, True, True, False]     # weights change
    warm = keys(["warmup.lr=0.02"])
    assert [warm[s] == base[s] for s in base] == [True, True, True, False]
    noise = keys(["noise.folds=3"])
    assert [noise[s] == base[s] for s in base] == [True, True, False, False]
    features = keys(["features.image_size=64"])
    assert [features[s] == base[s] for s in base] == [True, False, False, False]
    classes, files = listing
    touched = files.assign(mtime_ns=files["mtime_ns"] + (np.arange(len(files)) == 0))
    assert all(a != b for a, b in zip(keys([], (classes, touched)).values(), base.values()))


def test_other_code_recomputes_every_shared_stage(monkeypatch):
    cfg = load_config()

    def keys():
        s = SharedStages("unused")
        s.key("scan", cfg, listing="L")
        s.key("features", cfg, backbone_sha256="abc", cache_dir="c")
        s.key("noise", cfg)
        s.key("warmup", cfg, device="cpu")
        return s.keys

    base = keys()
    monkeypatch.setattr("app.sweep.shared.code_version", lambda: "0.0.0+gother")
    other = keys()
    assert all(other[s] != base[s] for s in base), (base, other)


def test_a_stage_is_stored_whole_and_fetched_by_its_key(tmp_path):
    cfg = load_config()
    src = tmp_path / "a.csv"
    src.write_text("x\n1\n")
    first = SharedStages(tmp_path / "shared")
    first.key("scan", cfg, listing="L")
    assert not first.fetch("scan", {"a.csv": tmp_path / "copy.csv"})
    first.publish("scan", {"a.csv": src, "missing.csv": tmp_path / "none.csv"}, 12.5)
    second = SharedStages(tmp_path / "shared")
    second.key("scan", cfg, listing="L")
    assert second.fetch("scan", {"a.csv": tmp_path / "copy.csv", "missing.csv": tmp_path / "m.csv"})
    assert (tmp_path / "copy.csv").read_text() == "x\n1\n" and not (tmp_path / "m.csv").exists()
    assert second.used["scan"] == {"key": second.keys["scan"], "reused": True, "seconds_when_computed": 12.5}
    other = SharedStages(tmp_path / "shared")
    other.key("scan", cfg, listing="M")
    assert not other.fetch("scan", {})
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [f"scan-{first.keys['scan']}"]   # no leftovers


def _sweep(tiny, out) -> int:
    """`python -m app sweep` in this process (its runs are run_train.sh processes, as always)."""
    return main(["sweep", str(tiny / "train"), str(out), "--grid", "warmup.lr=0.01,0.02",
                 "--weights", str(tiny / "tiny_backbone.pt"), "--allow-nonstandard-backbone",
                 *FAST, "--precision", "no", "--set", "validation.max_fraction=0.4"])


def test_a_killed_sweep_resumes_and_later_runs_reuse_the_shared_stages(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")        # the runs' processes, as the other pipeline tests'
    sigterm = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "sweep"
    first, second = out / "warmup.lr=0.01", out / "warmup.lr=0.02"
    # 37 images / batch 8: 4 steps an epoch; a crash at step 5, after epoch 1's checkpoint
    monkeypatch.setenv(FAIL_ENV, "5")                  # the runs inherit it
    assert _sweep(tiny, out) == 1 and "run warmup.lr=0.01 failed" in capsys.readouterr().err
    assert "simulated crash" in (first / "train.log").read_text()
    assert not (first / "model.pt").exists() and not second.exists()

    monkeypatch.delenv(FAIL_ENV)
    assert _sweep(tiny, out) == 0
    assert "run 1/2 warmup.lr=0.01: resume" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is sigterm          # the sweep's own `kill` handler is gone
    assert "resumed from" in (first / "train.log").read_text()
    report = json.loads((second / "train_report.json").read_text())
    # the second run took the scan, features and noise stage stored by the first; the warmup's own
    # setting differs: recomputed, and stored under its own key
    assert {k: v["reused"] for k, v in report["shared_stages"].items()} == \
        {"scan": True, "features": True, "noise": True, "warmup": False}
    assert "shared: the noise stage reused" in (second / "train.log").read_text()
    stored = json.loads((out / "shared" / f"noise-{report['shared_stages']['noise']['key']}" / "stage.json").read_text())
    assert report["stage_seconds"]["noise"] < stored["seconds"]
    assert len(list((out / "shared").glob("warmup-*"))) == 2 and len(list((out / "shared").glob("noise-*"))) == 1
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["seconds_saved_by_shared_stages"]["noise"] == stored["seconds"]
    assert "warmup" not in summary["seconds_saved_by_shared_stages"]
    assert {r["name"] for r in summary["runs"]} == {"warmup.lr=0.01", "warmup.lr=0.02"}
    assert summary["recommended"] in {"warmup.lr=0.01", "warmup.lr=0.02"}
    assert (out / "sweep.png").stat().st_size > 0 and "Recommended" in (out / "sweep.md").read_text()
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["warmup"]["lr"] in (0.01, 0.02) and "validation" not in best and "shared_dir" not in best
    assert "--config" in summary["reproduce"]["run_train"] and "--weights" not in summary["reproduce"]["docker"]
    # run again: every run is finished, nothing trains
    runs, _ = prepare_sweep(tiny / "train", out, ["warmup.lr=0.01,0.02"], 12,
                            ["--weights", str(tiny / "tiny_backbone.pt"), "--allow-nonstandard-backbone",
                             *FAST, "--precision", "no", "--set", "validation.max_fraction=0.4"])
    assert [r["state"] for r in runs] == ["finished", "finished"]
    assert summary["sweep_split"] == []                         # the options gave the split
    # the same settings spelled otherwise are the same runs; other options are refused, not overwritten
    runs, _ = prepare_sweep(tiny / "train", out, ["warmup.lr=0.01,0.02"], 12,
                            ["--set", "validation.max_fraction=0.40", "--precision", "no", "--weights",
                             str(tiny / "train" / ".." / "tiny_backbone.pt"), "--allow-nonstandard-backbone", *FAST])
    assert [r["state"] for r in runs] == ["finished", "finished"]
    with pytest.raises(ValueError, match="was trained with other options") as refused:
        prepare_sweep(tiny / "train", out, ["warmup.lr=0.01,0.02"], 12, ["--precision", "no"])
    assert "only its validation split differs" not in str(refused.value)        # the weights differ too
    # runs of another split only: the message says which --set continues them, and that does
    options = ["--weights", str(tiny / "tiny_backbone.pt"), "--allow-nonstandard-backbone", *FAST, "--precision", "no"]
    with pytest.raises(ValueError, match="only its validation split differs: give the sweep --set "
                                         "validation.max_fraction=0.4 to continue it"):
        prepare_sweep(tiny / "train", out, ["warmup.lr=0.01,0.02"], 12, options)
    runs, _ = prepare_sweep(tiny / "train", out, ["warmup.lr=0.01,0.02"], 12,
                            [*options, "--set", "validation.max_fraction=0.4"])
    assert [r["state"] for r in runs] == ["finished", "finished"]
    # with a validation option of the user's own too, the items named are those that make it the same
    mine = [*options, "--set", "validation.max_class_share=0.3"]
    with pytest.raises(ValueError, match="give the sweep --set validation.max_class_share=0.2 --set "
                                         "validation.max_fraction=0.4 to continue it"):
        prepare_sweep(tiny / "train", out, ["warmup.lr=0.01,0.02"], 12, mine)
    runs, _ = prepare_sweep(tiny / "train", out, ["warmup.lr=0.01,0.02"], 12,
                            [*mine, "--set", "validation.max_class_share=0.2", "--set", "validation.max_fraction=0.4"])
    assert [r["state"] for r in runs] == ["finished", "finished"]


def _constructed_run(folder: Path, right: np.ndarray, classes: int = 20) -> Path:
    """A run folder as training leaves it, with predictions right where `right` says."""
    folder.mkdir(parents=True)
    n = len(right)
    given = [f"c{i % classes:02d}" for i in range(n)]
    pd.DataFrame({"path": [f"{g}/{i}.jpg" for i, g in enumerate(given)], "given_label": given,
                  "clean_score": 0.9, "class_mean_score": 0.8,
                  "predicted": [g if ok else "c99" for g, ok in zip(given, right)]}
                 ).to_csv(folder / "validation_split.csv", index=False)
    (folder / "train_report.json").write_text(json.dumps({
        "seed": 0, "code_version": "test", "total_seconds": 10.0,
        "finetune_epochs": [{"epoch": 1, "estimated_test_top1": 0.5}, {"epoch": 2, "estimated_test_top1": float(right.mean())}],
        "shared_stages": {"noise": {"key": "k", "reused": True, "seconds_when_computed": 4.0}}}))
    return folder


def test_runs_are_ranked_paired_and_ties_go_to_the_default(tmp_path):
    n = 200
    right = {"2e-4": np.ones(n, bool), "1e-3": np.r_[np.zeros(2, bool), np.ones(n - 2, bool)],
             "2e-3": np.r_[np.zeros(60, bool), np.ones(n - 60, bool)]}
    runs = []
    for text, ok in right.items():
        name = f"finetune.lr={text}"
        runs.append({"name": name, "settings": {"finetune.lr": float(text)}, "sets": [name],
                     "dir": _constructed_run(tmp_path / name, ok)})
    from app.compare import compare, load_run
    rows = compare([{**load_run(r["dir"]), "run": r["name"]} for r in runs])
    by = {r["run"]: r for r in rows}
    assert by["finetune.lr=2e-4"]["best_in_group"]
    assert by["finetune.lr=2e-3"]["minus_best_interval95"][1] < 0               # 60 images worse: separated
    lo, hi = by["finetune.lr=1e-3"]["minus_best_interval95"]
    assert lo < 0 < hi                                                           # 2 images worse: tied
    assert by["finetune.lr=1e-3"]["verdict"] == "not separable from the best"
    # the default (1e-3 here) is tied with the best: it is the recommendation
    pick, why, tied = recommend(rows, runs, {"finetune.lr": 1e-3})
    assert pick["name"] == "finetune.lr=1e-3" and "not separable" in why
    assert set(tied) == {"finetune.lr=2e-4", "finetune.lr=1e-3"}
    # the default separated from the best: the best estimate
    pick, why, _ = recommend(rows, runs, {"finetune.lr": 2e-3})
    assert pick["name"] == "finetune.lr=2e-4" and "default is not among them" in why
    # the whole answer, with the defaults' own learning rate (2e-4) the best
    options = ["--set", "finetune.epochs=3", "--set", "validation.per_class=2", "--seed", "3",
               "--image-size", "native", "--num-workers", "1"]
    args = check_train_options(tmp_path / "train", tmp_path, options)
    text = write_answer(tmp_path / "train", tmp_path, runs, args, options, 5.0)
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["recommended"] == "finetune.lr=2e-4" and summary["default_run"] == "finetune.lr=2e-4"
    assert summary["seconds_saved_total"] == 12.0                  # 3 runs x 4 s of a reused noise stage
    assert "not separable from the best" in text and "worse than the best" in text
    assert "configs/submission.yaml" in text        # how the pick reaches the organisers' plain command
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    # every option that shapes the model (not the split's own settings, not where the program runs)
    assert best == {"seed": 3, "input": {"image_size": "native"}, "finetune": {"epochs": 3, "lr": 2e-4}}
    assert summary["reproduce"]["run_train"].endswith(f"--config {tmp_path / 'best.yaml'} --seed 3 "
                                                      "--image-size native --num-workers 1")


def test_a_set_too_small_for_one_image_a_class_gets_a_split_of_a_class_subset():
    rng = np.random.default_rng(0)
    sizes = rng.integers(6, 60, size=102)
    sizes = (sizes * 3296 / sizes.sum()).astype(int).clip(5)
    labels = np.repeat(np.arange(102), sizes)
    vcfg = {"per_class": 3, "max_class_share": 0.2, "max_fraction": 0.03}
    rows = validation_split(labels, 102, vcfg, seed=0)
    per_class = np.bincount(labels[rows], minlength=102)
    assert len(rows) == int(0.03 * len(labels)) < 102 and per_class.max() == 1
    assert np.array_equal(rows, validation_split(labels, 102, vcfg, seed=0))
    assert not np.array_equal(np.flatnonzero(per_class), np.flatnonzero(
        np.bincount(labels[validation_split(labels, 102, vcfg, seed=1)], minlength=102)))
    # every class in the split weighs alike: the estimate stands for the classes left out as well
    correct = labels[rows] % 2 == 0
    estimate, _ = estimate_top1(correct, labels[rows], np.ones(len(rows)), np.ones(102))
    assert estimate == pytest.approx(correct.mean())
    assert validation_split(labels, 102, {**vcfg, "per_class": 0}, seed=0).size == 0
