"""The trusted split and the estimated test top-1 (app/validation.py): class-balanced, drawn
uniformly among the clean-held images (not the top scores), deterministic for a seed, held out of
everything that trains (warmup, fine-tuning, the class prior) with its byte-identical copies; a
tiny run reports the estimate with an interval, per epoch and for model.pt; per_class 0 trains on
every image as before."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from app.finetune import WeightAverage
from app.model import log_class_prior
from app.validation import choose_splits, per_class_counts, trusted_estimate, trusted_split, wilson_interval
from tests.conftest import FAST, ROOT, app_env

VCFG = {"per_class": 3, "max_class_share": 0.2, "max_fraction": 0.5}


def noisy_images(sizes=(100, 60, 30, 8, 3), seed=0) -> pd.DataFrame:
    """What the noise stage hands over: a label, a clean posterior, a weight (0 when flagged), a flag
    and a content hash per image; a fifth of each class flagged."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    score = rng.uniform(0.4, 1.0, len(labels))
    flagged = rng.random(len(labels)) < 0.2
    score[flagged] = rng.uniform(0.0, 0.3, flagged.sum())
    return pd.DataFrame({"path": [f"{c:04d}/{i}.jpg" for i, c in enumerate(labels)], "label": labels,
                         "clean_score": score, "weight": np.where(flagged, 0.0, score),
                         "flag": np.where(flagged, "suspect_label", "clean").astype(object),
                         "hash": [f"h{i}" for i in range(len(labels))]})


def test_the_trusted_split_is_class_balanced_within_the_caps():
    images = noisy_images()
    split = trusted_split(images, 5, VCFG, seed=0)
    per_class = np.bincount(images["label"].to_numpy()[split], minlength=5)
    clean_held = np.bincount(images["label"][images["weight"] > 0], minlength=5)
    # per_class where a fifth of the clean-held images allows it, fewer below, none for a 3-image class
    assert per_class.tolist() == [min(3, int(0.2 * n)) for n in clean_held]
    assert per_class[:3].tolist() == [3, 3, 3] and per_class[4] == 0
    assert len(set(split)) == len(split)
    # the global cap lowers per_class for every class alike until both splits (the trusted one and the
    # noisy contrast, as large again) fit: 201 images x 8% = 16 -> 2 per class (14 held out in all)
    lowered = per_class_counts(images, 5, {**VCFG, "max_fraction": 0.08})
    assert lowered.max() == 2 and 2 * lowered.sum() <= 0.08 * len(images)
    assert per_class_counts(images, 5, {**VCFG, "max_fraction": 0.06}).max() == 1
    assert per_class_counts(images, 5, {**VCFG, "max_fraction": 0.001}).sum() == 0


def test_the_trusted_split_is_deterministic_for_a_seed():
    images = noisy_images()
    a, b = trusted_split(images, 5, VCFG, seed=3), trusted_split(images, 5, VCFG, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, trusted_split(images, 5, VCFG, seed=4))


def test_the_draw_is_uniform_among_the_clean_held_images_not_the_top_scores():
    """One class: 10 images the noise stage is sure of (0.95), 10 it keeps with doubts (0.4), 5
    dropped duplicate copies and 5 flagged images (weight 0). A uniform draw of 2 among the 20 kept
    picks a doubted image half of the time (the top scores never would); never a weight-0 image."""
    score = np.r_[np.full(10, 0.95), np.full(10, 0.4), np.full(5, 0.9), np.full(5, 0.1)]
    flag = ["clean"] * 20 + ["duplicate"] * 5 + ["suspect_label"] * 5
    images = pd.DataFrame({"label": np.zeros(30, int), "clean_score": score, "flag": flag,
                           "weight": np.where(np.array(flag) == "clean", score, 0.0)})
    cfg = {"per_class": 2, "max_class_share": 1.0, "max_fraction": 1.0}
    picks = np.concatenate([trusted_split(images, 1, cfg, seed=s) for s in range(300)])
    assert 0.4 < np.isin(picks, np.arange(10, 20)).mean() < 0.6
    assert not np.isin(picks, np.arange(20, 30)).any()


def test_splits_are_disjoint_and_hold_out_byte_identical_copies():
    images = noisy_images()
    cfg = {"seed": 0, "validation": VCFG}
    first = choose_splits(images, 5, cfg)
    picked = first.trusted[0]
    copy = next(i for i in range(len(images))
                if not first.held_out[i] and images["label"][i] != images["label"][picked])
    images.loc[copy, "hash"] = images.loc[picked, "hash"]      # a byte-identical copy filed elsewhere
    splits = choose_splits(images, 5, cfg)
    assert np.array_equal(splits.trusted, first.trusted) and len(splits.noisy_random) == len(splits.trusted)
    assert not set(splits.trusted) & set(splits.noisy_random)
    assert splits.held_out[copy] and copy not in splits.noisy_random
    assert splits.held_out.sum() == 2 * len(splits.trusted) + 1
    # the random split ignores classes and scores: flagged images are in it too
    assert (images["weight"].to_numpy()[splits.noisy_random] == 0).any()
    assert choose_splits(images, 5, {**cfg, "validation": {**VCFG, "per_class": 0}}) is None


def test_the_estimate_is_the_mean_per_class_top1_with_a_wilson_interval():
    # class 0: 4 images, 3 right; class 1: 1 image, wrong -> (0.75 + 0) / 2, not 3/5
    correct, labels = np.array([1, 1, 1, 0, 0], bool), np.array([0, 0, 0, 0, 1])
    estimate, interval = trusted_estimate(correct, labels)
    assert estimate == pytest.approx(0.375)
    effective_n = 4 / (1 / 4 + 1 / 1)                  # Kish: K^2 / sum(1/n_c) = 3.2 < 5 images
    assert interval == pytest.approx(wilson_interval(0.375, effective_n))
    assert interval[0] < 0.375 < interval[1]
    assert wilson_interval(0.5, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)   # textbook value
    assert wilson_interval(1.0, 6)[1] == 1.0 and wilson_interval(1.0, 6)[0] == pytest.approx(0.6097, abs=1e-4)


def test_evaluating_the_average_leaves_the_trained_weights_alone():
    p = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([p], decay=0.5)
    with torch.no_grad():
        p.add_(1.0)
    average.update()
    trained = p.detach().clone()
    with average.swapped_in():
        assert torch.allclose(p, average.average[0]) and not torch.equal(p, trained)
    assert torch.equal(p, trained)


def _train(tiny, out, *extra):
    return subprocess.run([sys.executable, "-m", "app", "train", str(tiny / "train"), str(out),
                           "--weights", str(tiny / "tiny_backbone.pt"), "--allow-nonstandard-backbone", *FAST, *extra],
                          env=app_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_a_run_reports_its_estimated_test_top1_and_never_trains_on_the_splits(tiny, tmp_path):
    run = _train(tiny, tmp_path, "--set", "validation.per_class=2", "--set", "validation.max_fraction=0.4")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "train_report.json").read_text())
    low, high = report["estimated_test_top1_interval95"]
    assert 0 <= low <= report["estimated_test_top1"] <= high <= 1 and 0 <= report["noisy_split_top1"] <= 1
    epochs = report["finetune_epochs"]
    assert len(epochs) == 2 and all({"estimated_test_top1", "noisy_split_top1"} <= set(e) for e in epochs)
    # the last epoch scored the averaged weights, which are what model.pt holds
    assert epochs[-1]["estimated_test_top1"] == report["estimated_test_top1"]
    tail = run.stderr.strip().splitlines()[-2:]
    assert "estimated test top-1:" in tail[0] and "95% interval" in tail[0] and "noisy random split" in tail[1]

    split = pd.read_csv(tmp_path / "validation_split.csv", dtype=str)
    trusted, noisy = split[split["split"] == "trusted"], split[split["split"] == "noisy_random"]
    assert trusted["given_label"].value_counts().tolist() == [2, 2, 2]          # class-balanced
    assert len(noisy) == len(trusted) == report["validation"]["trusted_images"] == 6
    assert report["validation"]["classes_covered"] == 3 and report["validation"]["classes"] == 4
    assert not set(trusted["path"]) & set(noisy["path"])
    assert report["images"]["held_out"] == 12 and report["images"]["trained_on"] == 37 - 12
    # the class prior counts only the images trained on (weights: the noise stage's, all 1 here)
    scores = pd.read_csv(tmp_path / "noise_scores.csv", dtype={"given_label": str})
    kept = scores[~scores["path"].isin(split["path"])]
    assert (kept["weight"] == 1).all()
    counts = torch.tensor(kept["given_label"].map({"0000": 0, "0001": 1, "0002": 2}).value_counts()
                          .reindex(range(4), fill_value=0).to_numpy(), dtype=torch.float64)
    model = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert torch.allclose(model["log_prior"], log_class_prior(counts))
    assert (tmp_path / "train_curves.png").stat().st_size > 1000


def test_per_class_zero_trains_on_every_image(tiny, tmp_path):
    run = _train(tiny, tmp_path, "--set", "validation.per_class=0", "--set", "finetune.epochs=1")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["estimated_test_top1"] is None and report["validation"]["trusted_images"] == 0
    assert report["images"]["held_out"] == 0 and report["images"]["trained_on"] == 37
    assert "estimated_test_top1" not in report["finetune_epochs"][0]
    assert not (tmp_path / "validation_split.csv").exists() and "estimated test top-1" not in run.stderr


def test_estimate_gap_parts_add_up_to_the_estimates_error():
    """bench/estimate_gap.py: label noise + selection + shift = estimate - measured, each from its table."""
    from bench.estimate_gap import decompose
    truth = pd.DataFrame({"path": [f"{c}/{i}.jpg" for c in "ab" for i in range(6)],
                          "true_label": ["a"] * 6 + ["b"] * 6,
                          "noise": ["clean"] * 5 + ["off_topic"] + ["clean"] * 6})
    truth.loc[5, "true_label"] = None                       # an off-topic picture has no true class
    truth = pd.concat([truth, pd.DataFrame({"path": ["a/x.jpg"], "true_label": ["b"], "noise": ["symmetric"]})])
    split = pd.DataFrame({"path": ["a/0.jpg", "a/x.jpg", "b/0.jpg", "b/1.jpg", "a/1.jpg", "a/5.jpg", "b/2.jpg"],
                          "split": ["trusted"] * 4 + ["noisy_random"] * 3,
                          "given_label": ["a", "a", "b", "b", "a", "a", "b"],
                          "clean_score": [0.9, 0.6, 0.8, 0.9, 0.9, 0.2, 0.5],
                          "predicted": ["a", "b", "a", "b", "a", "b", "a"]})
    # trusted vs true: class a 1/1, class b: x.jpg (true b) right, 0.jpg wrong, 1.jpg right -> 2/3
    # random vs true (off-topic a/5 left out): a/1 right (a: 5 in-class images), b/2 wrong (b: 7)
    parts = decompose(split, truth, estimate=0.5, measured=0.4)
    assert parts["trusted_true"] == pytest.approx(round((1 + 2 / 3) / 2, 4))
    assert parts["random_true"] == pytest.approx(round((1 / 5) / (1 / 5 + 1 / 7), 4))
    assert parts["trusted_images"] == 4 and parts["random_images"] == 2
    # the candidate: the random split against its given labels, weighted by clean score, per class
    # a: (0.9 x right + 0.2 x wrong) / 1.1, b: 0 / 0.5 -> their mean
    assert parts["posterior_weighted"] == pytest.approx(round((0.9 / 1.1 + 0) / 2, 4))
    total = parts["label_noise"] + parts["selection"] + parts["shift"]
    assert total == pytest.approx(0.5 - 0.4, abs=2e-4)
