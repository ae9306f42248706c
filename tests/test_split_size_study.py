"""bench/split_size_study.py (issue 13: how large a split the bar needs, and what it costs): on an
audit of the tiny set, the run is read row for row as training reads it, every split holds k images
a class within the caps, the probe fitted on every image is the same for all k of a seed, the truth
file's two parts add up to the error, a rerun gives the same figures, and the summary's arithmetic
(error, MAE, hold-out cost) is what its rows say."""
import json

import pandas as pd
import pytest
import torch

from app.__main__ import main
from bench import split_size_study
from tests.conftest import FAST


def _study(tiny, run, out, *extra):
    """bench/split_size_study.py, in this process (which it sets to one thread: restored after)."""
    threads = torch.get_num_threads()
    try:
        split_size_study.main(["--run", str(run), "--data", str(tiny), "--weights", str(tiny / "tiny_backbone.pt"),
                               "--per-class", "1", "2", "--splits", "2", "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)


def test_split_size_study_on_an_audit(tiny, tmp_path):
    run = tmp_path / "audit"
    assert main(["audit", str(tiny / "train"), str(run), "--weights", str(tiny / "tiny_backbone.pt"),
                 "--allow-nonstandard-backbone", *FAST]) == 0
    scores = pd.read_csv(run / "noise_scores.csv", dtype=str)
    # the studies' reading of a run: the decoded images only (the tiny set has undecodable files),
    # row for row with the noise stage's scores and the cached features
    images, feats, _ = split_size_study.load_audit(run)
    assert images["path"].tolist() == scores["path"].tolist() and len(feats) == len(images)
    assert images["clean_score"].round(4).tolist() == scores["clean_score"].astype(float).tolist()
    truth = tmp_path / "truth.csv"                                  # a truth file: every label right
    scores.assign(true_label=scores["given_label"], noise="clean")[["path", "given_label", "true_label", "noise"]] \
        .to_csv(truth, index=False)
    _study(tiny, run, tmp_path / "a.json", "--truth", str(truth))
    result = json.loads((tmp_path / "a.json").read_text())
    rows = pd.DataFrame(result["splits"])
    # three classes with 10+ images, at most 20% of a class each: k = 1 and 2 are both reachable
    assert rows.groupby("per_class")["split_images"].unique().map(list).to_dict() == {1: [3], 2: [6]}
    assert (rows.groupby("seed")["dev_test_all_images"].nunique() == 1).all()     # one all-image probe a seed
    assert rows["estimate"].between(-0.5, 1.5).all() and rows["dev_test"].between(0, 1).all()
    # the truth file's two parts (the weighting's, the photos') add up to the estimate's error
    assert (rows["labels_part"] + rows["shift_part"]).to_numpy() == pytest.approx(
        (rows["estimate"] - rows["dev_test"]).to_numpy(), abs=2e-4)
    summary = result["by_images_per_class"]
    assert summary["2"]["held_out_share_mean"] > summary["1"]["held_out_share_mean"]
    assert (tmp_path / "a.png").stat().st_size > 1000
    _study(tiny, run, tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["splits"] == [
        {k: v for k, v in row.items() if k not in ("split_true_top1", "labels_part", "shift_part")}
        for row in result["splits"]]


def test_the_summary_is_its_rows_arithmetic():
    summarise = split_size_study.summarise
    frame = pd.DataFrame({"split_images": [100, 100], "held_out_share": [0.01, 0.02],
                          "dev_test": [0.50, 0.40], "estimate": [0.52, 0.36],
                          "estimate_without_control_variate": [0.55, 0.40], "noisy_split": [0.40, 0.30],
                          "effective_size": [100.0, 100.0], "variance_left": [0.5, 0.7],
                          "dev_test_all_images": [0.51, 0.42]})
    s = summarise(frame)
    assert s["mean_error_points"] == pytest.approx(-1.0) and s["mae_points"] == pytest.approx(3.0)
    assert s["share_within_3_points"] == 0.5 and s["mae_without_control_variate_points"] == pytest.approx(2.5)
    assert s["noisy_split_mae_points"] == pytest.approx(10.0) and s["hold_out_cost_points"] == pytest.approx(1.5)
    assert s["variance_left_by_control_variate_mean"] == pytest.approx(0.6)
