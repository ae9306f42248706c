"""app.studies.make_noisy on a tiny generated clean dataset: layout, noise kinds, proportions, determinism."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from app.__main__ import main
from app.studies.make_noisy import make_noisy

CLASSES = ["daisy", "rose", "tulip 2", "0003", "Iris", "lily"]      # arbitrary folder names
ARGS = dict(symmetric=0.1, pair=0.2, off_topic_frac=0.1, duplicates=0.05, imbalance=5)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    colours = np.random.default_rng(0).permutation(256 ** 3)[:130]
    k = 0
    for c in CLASSES:
        (root / "clean" / c).mkdir(parents=True)
        for j in range(20):
            rgb = tuple(int(colours[k]) >> s & 255 for s in (16, 8, 0))
            Image.new("RGB", (16, 16), rgb).save(root / "clean" / c / f"img_{j:02d}.jpg", quality=95)
            k += 1
    (root / "junk" / "sub").mkdir(parents=True)
    for j in range(10):
        rgb = tuple(int(colours[k]) >> s & 255 for s in (16, 8, 0))
        Image.new("RGB", (16, 16), rgb).save(root / "junk" / ("sub" if j % 2 else "") / f"x{j}.PNG")
        k += 1
    return root


@pytest.fixture(scope="module")
def made(src):
    stats = make_noisy(src / "clean", src / "out", off_topic_dir=src / "junk", seed=3, **ARGS)
    truth = pd.read_csv(src / "out" / "train_truth.csv", dtype=str, keep_default_na=False)
    return src / "out", truth, stats


def test_truth_matches_files_on_disk(made):
    out, truth, stats = made
    on_disk = sorted(str(p.relative_to(out)) for p in (out / "train").rglob("*") if p.is_file())
    assert sorted(truth["path"]) == on_disk
    assert list(truth.columns) == ["path", "given_label", "true_label", "noise"]
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(CLASSES)
    assert (truth["path"].str.split("/").str[1] == truth["given_label"]).all()
    names = truth["path"].str.split("/").str[2]
    assert names.str.fullmatch(r"[0-9a-f]{16}\.(jpg|PNG)").all() and names.is_unique
    assert stats["train_images"] == len(truth)
    assert json.loads((out / "stats.json").read_text()) == stats


def test_noise_kinds(made, src):
    out, truth, stats = made
    by = dict(list(truth.groupby("noise")))
    assert set(by) == {"clean", "confusable", "symmetric", "off_topic", "duplicate_other_class"}
    assert (by["clean"]["given_label"] == by["clean"]["true_label"]).all()
    assert (by["symmetric"]["given_label"] != by["symmetric"]["true_label"]).all()
    pairs = by["confusable"].groupby("true_label")["given_label"].unique()
    assert (pairs.str.len() == 1).all()                                     # one fixed partner per class
    assert all(t != g[0] and stats["pair_partners"][t] == g[0] for t, g in pairs.items())
    assert sorted(stats["pair_partners"]) == sorted(CLASSES)

    off_bytes = {p.read_bytes() for p in (src / "junk").rglob("*.PNG")}
    assert (by["off_topic"]["true_label"] == "-1").all()
    assert all((out / p).read_bytes() in off_bytes for p in by["off_topic"]["path"])

    clean = {(out / p).read_bytes(): g for p, g in zip(by["clean"]["path"], by["clean"]["given_label"])}
    for p, g, t in by["duplicate_other_class"][["path", "given_label", "true_label"]].itertuples(index=False):
        b = (out / p).read_bytes()
        assert b in clean and clean[b] == t and g != t                     # copy of a clean image, other class


def test_proportions(made):
    out, truth, stats = made
    in_class = truth[~truth["noise"].isin(["off_topic", "duplicate_other_class"])]
    kept = in_class["true_label"].value_counts()
    assert len(kept) == len(CLASSES) and kept.max() == 20                  # the largest class keeps all
    assert 4 <= kept.max() / kept.min() <= 6
    clean = truth[truth["noise"] == "clean"]["true_label"]
    assert set(clean) == set(CLASSES)                                      # a clean anchor in every class
    n = len(in_class)
    counts = truth["noise"].value_counts()
    for kind, frac in [("confusable", 0.2), ("symmetric", 0.1), ("off_topic", 0.1), ("duplicate_other_class", 0.05)]:
        assert abs(counts[kind] - frac * n) <= 1, kind
        assert stats["noise_kinds"][kind] == counts[kind]
    assert stats["kept_per_class_max_median_min"][0] == 20 and stats["seed"] == 3


def test_deterministic(src, made):
    _, truth, _ = made
    make_noisy(src / "clean", src / "again", off_topic_dir=src / "junk", seed=3, **ARGS)
    make_noisy(src / "clean", src / "other", off_topic_dir=src / "junk", seed=4, **ARGS)
    read = lambda d: pd.read_csv(src / d / "train_truth.csv", dtype=str, keep_default_na=False)  # noqa: E731
    pd.testing.assert_frame_equal(read("again"), truth)
    assert not read("other").equals(truth)


def test_cli(src):
    assert main(["make-noisy", str(src / "clean"), str(src / "cli"), "--off-topic", str(src / "junk"), "0.5",
                 "--imbalance", "1", "--seed", "1"]) == 0
    stats = json.loads((src / "cli" / "stats.json").read_text())
    assert stats["kept_per_class_max_median_min"] == [20, 20, 20] and stats["noise_kinds"]["off_topic"] == 60


@pytest.mark.parametrize("change, match", [
    (dict(clean_dir="missing"), "not found"), (dict(symmetric=0.6, pair=0.5), "<= 1"), (dict(pair=-0.1), r"\[0, 1\]"),
    (dict(duplicates=1.5), r"\[0, 1\]"), (dict(out_dir="out"), "already exists"),
    (dict(clean_dir="clean/rose"), "at least 2"), (dict(imbalance=0.5), ">= 1"), (dict(off_topic_dir=None), "off-topic")])
def test_bad_arguments(src, made, change, match):
    kw = dict(clean_dir="clean", out_dir="bad", off_topic_dir="junk", **ARGS) | change
    for k in ("clean_dir", "out_dir", "off_topic_dir"):
        kw[k] = None if kw[k] is None else src / kw[k]
    with pytest.raises(ValueError, match=match):
        make_noisy(**kw)
    assert not (src / "bad" / "train").exists()
