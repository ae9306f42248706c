"""The validation split and the estimated test top-1 (app/validation.py): drawn uniformly within each
class whatever the clean scores, deterministic for a seed, held out of everything that trains
(warmup, fine-tuning, the class prior) with its byte-identical copies; the estimate weighs each image
by its clean score and averages the classes; the contrast is the plain noisy-label top-1 of a uniform
random split; a tiny run reports the estimate with an interval, per epoch and for model.pt;
per_class 0 trains on every image as before."""
import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from app import finetune
from app.__main__ import main
from app.finetune import WeightAverage
from app.model import log_class_prior
from app.validation import (ProbeCovariate, choose_split, class_mean_scores, estimate_top1, estimate_with_size,
                            noisy_split_top1, paired_difference, per_class_counts, probe_covariate, validation_split,
                            wilson_interval)
from tests.conftest import tiny_train_args

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


def test_the_split_is_class_balanced_within_the_caps():
    labels = noisy_images()["label"].to_numpy()
    split = validation_split(labels, 5, VCFG, seed=0)
    per_class = np.bincount(labels[split], minlength=5)
    # per_class where a fifth of the class allows it, fewer below, none for a 3-image class
    assert per_class.tolist() == [3, 3, 3, 1, 0]
    assert len(set(split)) == len(split)
    # the global cap lowers per_class for every class alike until the split fits: 201 images x 4.5% = 9
    lowered = per_class_counts(labels, 5, {**VCFG, "max_fraction": 0.045})
    assert lowered.tolist() == [2, 2, 2, 1, 0] and lowered.sum() <= 0.045 * len(labels)
    assert per_class_counts(labels, 5, {**VCFG, "max_fraction": 0.03}).tolist() == [1, 1, 1, 1, 0]
    assert per_class_counts(labels, 5, {**VCFG, "max_fraction": 0.001}).sum() == 0


def test_the_split_is_deterministic_for_a_seed():
    labels = noisy_images()["label"].to_numpy()
    a, b = validation_split(labels, 5, VCFG, seed=3), validation_split(labels, 5, VCFG, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, validation_split(labels, 5, VCFG, seed=4))


def test_the_draw_ignores_the_clean_scores():
    """One class: 10 images the noise stage is sure of, 10 it doubts, 10 it flags. A draw of 3 takes
    each kind at its rate (a third), flagged and doubted images included: the weighting, not the
    draw, accounts for them."""
    labels = np.zeros(30, int)
    cfg = {"per_class": 3, "max_class_share": 1.0, "max_fraction": 1.0}
    picks = np.concatenate([validation_split(labels, 1, cfg, seed=s) for s in range(300)])
    for kind in (np.arange(10), np.arange(10, 20), np.arange(20, 30)):
        assert 0.28 < np.isin(picks, kind).mean() < 0.39


def test_the_split_holds_out_byte_identical_copies():
    images = noisy_images()
    cfg = {"seed": 0, "validation": VCFG}
    first = choose_split(images, 5, cfg)
    picked = first.rows[0]
    copy = next(i for i in range(len(images))
                if not first.held_out[i] and images["label"][i] != images["label"][picked])
    images.loc[copy, "hash"] = images.loc[picked, "hash"]      # a byte-identical copy filed elsewhere
    split = choose_split(images, 5, cfg)
    assert np.array_equal(split.rows, first.rows)
    assert split.held_out[copy] and copy not in split.rows
    assert split.held_out.sum() == len(split.rows) + 1
    assert choose_split(images, 5, {**cfg, "validation": {**VCFG, "per_class": 0}}) is None


def test_the_estimate_weighs_images_by_clean_score_over_their_class_mean():
    # class 0 (mean clean score 0.5 over all its images): right on two sure images (1.0), wrong on a
    # doubted one (0.5) and on a flagged one (0): each weighs score / (4 x 0.5). Class 1 (mean 0.9):
    # one image, wrong, weighs 0.9 / (1 x 0.9) = 1. sum(u x right) / sum(u) = 1 / (1.25 + 1)
    correct = np.array([1, 1, 0, 0, 0], bool)
    labels, score, class_mean = np.array([0, 0, 0, 0, 1]), np.array([1.0, 1.0, 0.5, 0.0, 0.9]), np.array([0.5, 0.9])
    estimate, interval = estimate_top1(correct, labels, score, class_mean)
    assert estimate == pytest.approx(1 / 2.25)
    u = np.array([0.5, 0.5, 0.25, 0.0, 1.0])
    assert interval == pytest.approx(wilson_interval(1 / 2.25, u.sum() ** 2 / np.sum(u ** 2)))   # Kish size
    assert interval[0] < estimate < interval[1]
    # one image a class: its weight still counts (a per-class ratio would read 1/2 here, not 0.9)
    one = estimate_top1(np.array([1, 0], bool), np.array([0, 1]), np.array([0.9, 0.1]), np.array([0.9, 0.9]))[0]
    assert one == pytest.approx(0.9)
    # every class weighs 1 in expectation however clean it is: scores at their class means give the
    # plain class-balanced top-1 ((1/2 + 0) / 2, not 1/3)
    flat = estimate_top1(np.array([1, 0, 0], bool), np.array([0, 0, 1]), np.array([0.8, 0.8, 0.2]), np.array([0.8, 0.2]))
    assert flat[0] == pytest.approx(0.25)
    assert np.isnan(estimate_top1(correct, labels, np.zeros(5), class_mean)[0])   # nothing the noise stage believes
    assert class_mean_scores(np.array([0, 0, 2]), np.array([0.2, 0.6, 1.0])) == pytest.approx([0.4, 0.0, 1.0])
    assert wilson_interval(0.5, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)   # textbook value
    assert wilson_interval(1.0, 6)[1] == 1.0 and wilson_interval(1.0, 6)[0] == pytest.approx(0.6097, abs=1e-4)


def test_the_contrast_is_a_uniform_random_splits_expected_top1():
    # 2 drawn of a 90-image class (both right), 2 of a 10-image class (both wrong): a uniform split
    # would be 90% from the first class -> 0.9, where the plain mean over the 4 images says 0.5
    correct, labels = np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1])
    assert noisy_split_top1(correct, labels, np.array([90, 10])) == pytest.approx(0.9)


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


def _train(tiny, out, *extra) -> int:
    """`python -m app train` on the tiny set, in this process through the program's entry point."""
    return main(tiny_train_args(tiny, out, *extra))


def test_a_run_reports_its_estimated_test_top1_and_never_trains_on_the_split(tiny, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="app"):
        assert _train(tiny, tmp_path, "--set", "validation.per_class=2", "--set", "validation.max_fraction=0.4") == 0
    report = json.loads((tmp_path / "train_report.json").read_text())
    low, high = report["estimated_test_top1_interval95"]
    assert 0 <= low <= report["estimated_test_top1"] <= high <= 1 and 0 <= report["noisy_split_top1"] <= 1
    epochs = report["finetune_epochs"]
    assert len(epochs) == 2 and all({"estimated_test_top1", "noisy_split_top1"} <= set(e) for e in epochs)
    # the last epoch scored the averaged weights, which are what model.pt holds
    assert epochs[-1]["estimated_test_top1"] == report["estimated_test_top1"]
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    at = max(i for i, (level, line) in enumerate(said) if level == "INFO" and "estimated test top-1:" in line)
    assert "95% interval" in said[at][1] and "noisy random split" in said[at + 1][1]
    assert all(level == "WARNING" for level, _ in said[at + 2:])   # at most the too-uncertain warning after it

    split = pd.read_csv(tmp_path / "validation_split.csv", dtype=str)
    assert split["given_label"].value_counts().tolist() == [2, 2, 2]          # class-balanced
    assert len(split) == report["validation"]["split_images"] == 6 and split["path"].is_unique
    assert report["validation"]["classes_covered"] == 3 and report["validation"]["classes"] == 4
    assert report["images"]["held_out"] == 6 and report["images"]["trained_on"] == 37 - 6
    # the report's figures are the model file's predictions in the table, scored as documented
    right = (split["predicted"] == split["given_label"]).to_numpy()
    labels = split["given_label"].astype(int).to_numpy()
    class_mean = np.zeros(4)
    class_mean[labels] = split["class_mean_score"].astype(float)
    rate = np.zeros(4)
    rate[labels] = split["class_probe_rate"].astype(float)
    probe = ProbeCovariate(split["probe_agrees"].astype(float).to_numpy(), rate)
    assert report["estimated_test_top1"] == pytest.approx(
        estimate_top1(right, labels, split["clean_score"].astype(float).to_numpy(), class_mean, probe)[0], abs=1e-4)
    assert report["estimate_without_control_variate"] == pytest.approx(
        estimate_top1(right, labels, split["clean_score"].astype(float).to_numpy(), class_mean)[0], abs=1e-4)
    # the class prior counts only the images trained on (weights: the noise stage's, all 1 here)
    scores = pd.read_csv(tmp_path / "noise_scores.csv", dtype={"given_label": str})
    kept = scores[~scores["path"].isin(split["path"])]
    assert (kept["weight"] == 1).all()
    counts = torch.tensor(kept["given_label"].map({"0000": 0, "0001": 1, "0002": 2}).value_counts()
                          .reindex(range(4), fill_value=0).to_numpy(), dtype=torch.float64)
    model = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert torch.allclose(model["log_prior"], log_class_prior(counts))
    assert (tmp_path / "train_curves.png").stat().st_size > 1000


def test_per_class_zero_trains_on_every_image(tiny, tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="app"):
        assert _train(tiny, tmp_path, "--set", "validation.per_class=0", "--set", "finetune.epochs=1") == 0
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["estimated_test_top1"] is None and report["validation"]["split_images"] == 0
    assert report["images"]["held_out"] == 0 and report["images"]["trained_on"] == 37
    assert "estimated_test_top1" not in report["finetune_epochs"][0]
    said = caplog.text + capsys.readouterr().err
    assert not (tmp_path / "validation_split.csv").exists() and "estimated test top-1" not in said
    assert "model written to" in said                                   # the run's log was heard


def test_evaluating_after_every_epoch_does_not_change_the_trained_model(tiny, tmp_path, monkeypatch):
    """The per-epoch estimate (the averaged weights swapped in, eval mode, a pass over the split) leaves
    training exactly as it was: the same run with the evaluation replaced by a no-op exports the
    same weights, bit for bit. So what holding the split out costs is the images, not the scoring."""
    split = ["--set", "finetune.epochs=3", "--set", "validation.per_class=2", "--set", "validation.max_fraction=0.4"]
    assert _train(tiny, tmp_path / "scored", *split) == 0
    monkeypatch.setattr(finetune, "_evaluate_epoch", lambda evaluate, classifier, average: {
        "estimated_test_top1": 0.0, "estimated_test_top1_interval95": [0.0, 0.0],
        "estimate_without_control_variate": 0.0, "noisy_split_top1": 0.0})
    assert _train(tiny, tmp_path / "not_scored", *split) == 0
    epochs = {name: json.loads((tmp_path / name / "train_report.json").read_text())["finetune_epochs"]
              for name in ("scored", "not_scored")}
    assert len(epochs["scored"]) == 3 and all("validation_seconds" in e for e in epochs["scored"])
    assert not any("validation_seconds" in e for e in epochs["not_scored"])     # the scoring did not run
    a, b = (torch.load(tmp_path / name / "model.pt", map_location="cpu", weights_only=True)
            for name in ("scored", "not_scored"))
    assert torch.equal(a["head_weight"], b["head_weight"]) and torch.equal(a["head_bias"], b["head_bias"])
    assert a["visual_state"].keys() == b["visual_state"].keys()
    assert all(torch.equal(v, b["visual_state"][k]) for k, v in a["visual_state"].items())
    assert not torch.equal(a["head_weight"], torch.zeros_like(a["head_weight"]))


def test_the_paired_difference_is_the_estimates_difference_with_a_narrower_interval():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(40), 3)
    score = rng.uniform(0.1, 1.0, len(labels))
    means = class_mean_scores(labels, score)
    right_b = rng.random(len(labels)) < 0.5
    right_a = right_b.copy()
    flip = rng.choice(len(labels), 12, replace=False)          # A and B disagree on 12 of 120 images
    right_a[flip[:10]], right_a[flip[10:]] = True, False
    a, interval_a = estimate_top1(right_a, labels, score, means)
    b, _ = estimate_top1(right_b, labels, score, means)
    delta, interval = paired_difference(right_a, right_b, labels, score, means)
    assert delta == pytest.approx(a - b)
    assert interval[0] < delta < interval[1]
    assert interval[1] - interval[0] < (interval_a[1] - interval_a[0]) / 2    # only the 12 disagreements move it
    same, none = paired_difference(right_a, right_a, labels, score, means)
    assert same == 0 and none == [0, 0]                          # identical predictions: no difference, no doubt
    # linearised variance by hand: two images, u = (1, 1), d = (1, 0) -> delta 1/2, se sqrt(2 x 1/4) / 2
    d, ci = paired_difference(np.array([1, 0], bool), np.array([0, 0], bool), np.array([0, 1]), np.ones(2), np.ones(2))
    assert d == 0.5 and ci == pytest.approx([0.5 - 1.959964 * np.sqrt(0.5) / 2, 1.0])


def write_run(path, predicted, paths=None, scores=None, seed=0):
    """A training output folder as `compare` reads it: validation_split.csv + train_report.json."""
    path.mkdir(parents=True)
    n = len(predicted)
    paths = paths or [f"{i % 4:04d}/{i}.jpg" for i in range(n)]
    pd.DataFrame({"path": paths, "given_label": [p[:4] for p in paths],
                  "clean_score": scores if scores is not None else np.linspace(0.3, 1.0, n),
                  "class_mean_score": 0.7, "predicted": predicted}).to_csv(path / "validation_split.csv", index=False)
    (path / "train_report.json").write_text(json.dumps({"seed": seed, "code_version": "test"}))
    return path


def test_compare_pairs_runs_on_the_same_split_and_only_those(tmp_path):
    from app.compare import compare, load_run, markdown, plot
    given = [f"{i % 4:04d}" for i in range(40)]
    better = write_run(tmp_path / "better", given)                                   # right on every image
    worse = write_run(tmp_path / "worse", given[:30] + ["0009"] * 10)                  # wrong on the last 10
    other = write_run(tmp_path / "other_seed", given, paths=[f"{i % 4:04d}/x{i}.jpg" for i in range(40)], seed=1)
    rows = {r["run"]: r for r in compare([load_run(p) for p in (worse, better, other)])}
    assert rows[str(better)]["best_in_group"] and rows[str(better)]["estimate"] == 1.0
    w = rows[str(worse)]
    assert w["split_group"] == rows[str(better)]["split_group"] != rows[str(other)]["split_group"]
    assert w["images_differing"] == 10 and w["minus_best"] == pytest.approx(w["estimate"] - 1.0, abs=1e-4)
    assert w["minus_best_interval95"][1] < 0 and w["verdict"] == "worse than the best"
    assert "minus_best" not in rows[str(other)]                  # another split: never paired
    text = markdown(list(rows.values()))
    assert "alone on its split" in text and "not paired" in text
    plot(list(rows.values()), tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0
    # other clean scores (another noise configuration): not the same weighting, not paired
    rescored = write_run(tmp_path / "rescored", given, scores=np.full(40, 0.9))
    assert len({r["split_group"] for r in compare([load_run(p) for p in (better, rescored)])}) == 2


def test_a_split_table_gets_its_control_variate_from_the_runs_noise_scores(tmp_path):
    """Tables written before the control variate: read_split_table derives it from noise_scores.csv
    (the probe's label for every training image); without probe labels there, the plain estimate."""
    from app.compare import read_split_table, split_probe
    run = write_run(tmp_path / "run", ["0000", "0001"], paths=["0000/a.jpg", "0001/c.jpg"], scores=[0.8, 0.6])
    pd.DataFrame({"path": ["0000/a.jpg", "0000/b.jpg", "0001/c.jpg", "0001/d.jpg"],
                  "given_label": ["0000", "0000", "0001", "0001"], "clean_score": [0.8, 0.2, 0.6, 0.6],
                  "probe_label": ["0000", "0001", "0000", "0001"]}).to_csv(run / "noise_scores.csv", index=False)
    table = read_split_table(run)
    assert table["probe_agrees"].tolist() == [1, 0]
    assert table["class_probe_rate"].tolist() == pytest.approx([0.8, 0.5])     # sum(score x agrees) / sum(score)
    probe = split_probe(table)
    assert probe.right.tolist() == [1, 0] and probe.class_rate.tolist() == pytest.approx([0.8, 0.5])
    pd.read_csv(run / "noise_scores.csv").drop(columns="probe_label").to_csv(run / "noise_scores.csv", index=False)
    assert split_probe(read_split_table(run)) is None


def test_compare_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 1
    assert "no validation_split.csv" in capsys.readouterr().err


def test_estimate_gap_parts_add_up_to_the_estimates_error():
    """bench/estimate_gap.py: labels + shift = weighted - measured, and for a run of the earlier design
    (a trusted split beside a uniform noisy one) label noise + selection + shift = its estimate - measured."""
    from bench.estimate_gap import decompose
    truth = pd.DataFrame({"path": [f"{c}/{i}.jpg" for c in "ab" for i in range(6)],
                          "given_label": ["a"] * 6 + ["b"] * 6, "true_label": ["a"] * 6 + ["b"] * 6,
                          "noise": ["clean"] * 5 + ["off_topic"] + ["clean"] * 6})
    truth.loc[5, "true_label"] = None                       # an off-topic picture has no true class
    truth = pd.concat([truth, pd.DataFrame({"path": ["a/x.jpg"], "given_label": ["a"], "true_label": ["b"],
                                            "noise": ["symmetric"]})])
    split = pd.DataFrame({"path": ["a/0.jpg", "a/x.jpg", "b/0.jpg", "b/1.jpg", "a/1.jpg", "a/5.jpg", "b/2.jpg"],
                          "split": ["trusted"] * 4 + ["noisy_random"] * 3,
                          "given_label": ["a", "a", "b", "b", "a", "a", "b"],
                          "clean_score": [0.9, 0.6, 0.8, 0.9, 0.9, 0.2, 0.5],
                          "class_mean_score": [0.55] * 7,
                          "predicted": ["a", "b", "a", "b", "a", "b", "a"]})
    # trusted vs true: class a 1/1, class b: x.jpg (true b) right, 0.jpg wrong, 1.jpg right -> 2/3
    # random vs true (off-topic a/5 left out): a/1 right (a: 5 in-class images), b/2 wrong (b: 7)
    parts = decompose(split, truth, estimate=0.5, measured=0.4)
    assert parts["trusted_true"] == pytest.approx(round((1 + 2 / 3) / 2, 4))
    assert parts["random_true"] == pytest.approx(round((1 / 5) / (1 / 5 + 1 / 7), 4))
    assert parts["trusted_images"] == 4 and parts["random_images"] == 3
    # the random split against its given labels: u = score / (count in the split x class mean)
    # a: 0.9 / 2 right, 0.2 / 2 wrong; b: 0.5 / 1 wrong (the class mean is the same for both here)
    assert parts["weighted"] == pytest.approx(round(0.45 / (0.45 + 0.1 + 0.5), 4))
    assert parts["label_noise"] + parts["selection"] + parts["shift"] == pytest.approx(0.5 - 0.4, abs=2e-4)
    assert parts["labels"] + parts["shift"] == pytest.approx(parts["weighted"] - 0.4, abs=2e-4)

    # the single-split design: drawn per given class, so each image counts 1 / (its class's draw rate x
    # its true class's count). a: 2 of 7 given-a images drawn (a/1 right, a/x true b wrong); b: 1 of 6 (right)
    single = split[split["split"] == "noisy_random"].drop(columns="split").copy()
    single[["path", "given_label", "predicted"]] = [["a/1.jpg", "a", "a"], ["a/x.jpg", "a", "a"], ["b/2.jpg", "b", "b"]]
    parts = decompose(single, truth, estimate=0.7, measured=0.6)
    w = {"a/1": 1 / (2 / 7 * 5), "a/x": 1 / (2 / 7 * 7), "b/2": 1 / (1 / 6 * 7)}
    assert parts["random_true"] == pytest.approx(round((w["a/1"] + w["b/2"]) / sum(w.values()), 4))
    assert np.isnan(parts["trusted"]) and parts["random_images"] == 3
    assert parts["weighted"] == 1.0                 # every prediction agrees with its given label


def test_estimate_gap_checks_sampling_and_pairs():
    """bench/estimate_gap.py: z = (estimate - measured) / both binomial errors; pairs only on a shared split."""
    from bench.estimate_gap import pairs, sampling
    split = pd.DataFrame({"path": [f"{i % 2}/{i}.jpg" for i in range(100)], "given_label": [str(i % 2) for i in range(100)],
                          "clean_score": 1.0, "class_mean_score": 1.0, "predicted": [str(i % 2) for i in range(100)]})
    split.loc[:49, "predicted"] = "x"                       # half right; weights all 1: Kish size 100
    s = sampling(split, measured=0.4, n_test=1000)
    se = np.sqrt(0.25 / 100 + 0.24 / 1000)
    assert s["effective_size"] == 100 and s["z"] == pytest.approx(round(0.1 / se, 3))
    better = split.assign(predicted=split["given_label"])
    table = pd.DataFrame({"bench": ["b"] * 3, "arm": ["half", "all", "moved"], "seed": [0] * 3,
                          "measured": [0.4, 0.6, 0.5], "noisy_split": [0.5, 0.4, 0.5]})
    moved = better.assign(path=better["path"] + "x")          # another split: not a pair
    result = pairs([split, better, moved], table)
    assert result["pairs"] == 1 and result["estimate_orders_right"] == 1.0 and result["noisy_split_orders_right"] == 0.0
    assert result["confident_pairs"] == 1 and result["list"][0]["estimate_points"] == -50.0


def test_the_control_variate_corrects_the_splits_luck_of_the_draw():
    """By hand: four images of one class, weights 1; the probe agrees with the label on 1 of the 4
    split images where it agrees on 3/4 of the class's images: the split drew hard images. The model
    is right where the probe is and on one more: slope beta = cov(x, y) / var(x) = (1/8) / (3/16) = 2/3,
    estimate 1/2 - 2/3 x (1/4 - 3/4) = 5/6."""
    right = np.array([1, 1, 0, 0], bool)
    labels, ones = np.zeros(4, int), np.ones(4)
    probe = ProbeCovariate(np.array([1.0, 0, 0, 0]), np.array([0.75]))
    estimate, interval = estimate_top1(right, labels, ones, np.ones(1), probe)
    assert estimate == pytest.approx(5 / 6)
    assert interval[0] < 5 / 6 < interval[1]
    # a probe that agrees as often on the split as on its classes changes nothing
    assert estimate_top1(right, labels, ones, np.ones(1), ProbeCovariate(np.array([1.0, 0, 1, 0]), np.array([0.5])))[0] \
        == pytest.approx(0.5)
    # a probe without spread on the split carries no slope: the plain estimate, the plain interval
    flat = ProbeCovariate(np.ones(4), np.array([0.6]))
    assert estimate_top1(right, labels, ones, np.ones(1), flat) == estimate_top1(right, labels, ones, np.ones(1))
    # the model right exactly where the probe is: the estimate is the probe's known rate, with a
    # far larger effective size than the split's four images
    value, size = estimate_with_size(probe.right.astype(bool), labels, ones, np.ones(1), probe)
    assert value == pytest.approx(0.75) and size > 100


def test_the_control_variate_is_unbiased_and_narrower_over_many_draws():
    """A synthetic training set whose images differ in difficulty: both the fine-tuned model and the
    frozen probe get the easy ones right more often. Over 400 draws of one image a class, the
    estimate with the control variate centres on the true class-balanced top-1 as the plain one
    does, and spreads less; its intervals cover the truth about as often as they say."""
    rng = np.random.default_rng(0)
    classes, per = 100, 50
    labels = np.repeat(np.arange(classes), per)
    ease = rng.normal(size=len(labels))
    model_p = 1 / (1 + np.exp(-(0.3 + 4 * ease)))           # the fine-tuned model's chance on each image
    probe_right = rng.random(len(labels)) < 1 / (1 + np.exp(-(-0.3 + 4 * ease)))
    model_right = rng.random(len(labels)) < model_p
    images = pd.DataFrame({"label": labels, "clean_score": 1.0,
                           "probe_label": np.where(probe_right, labels, (labels + 1) % classes)})
    truth = model_right.reshape(classes, per).mean(1).mean()
    ones = np.ones(classes)
    plain, with_cv, covered = [], [], 0
    for seed in range(400):
        rows = validation_split(labels, classes, {"per_class": 1, "max_class_share": 1.0, "max_fraction": 1.0}, seed)
        probe = probe_covariate(images, rows)
        plain.append(estimate_top1(model_right[rows], labels[rows], np.ones(len(rows)), ones)[0])
        estimate, interval = estimate_top1(model_right[rows], labels[rows], np.ones(len(rows)), ones, probe)
        with_cv.append(estimate)
        covered += interval[0] <= truth <= interval[1]
    plain, with_cv = np.array(plain), np.array(with_cv)
    assert abs(with_cv.mean() - truth) < 0.01 and abs(plain.mean() - truth) < 0.01
    assert with_cv.std() < 0.85 * plain.std()
    assert 0.9 <= covered / 400 <= 0.99
