"""Noise stage: each signal on small synthetic features with a known answer, and the output contract."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from app import noise as nz
from app.noise import groups as dup_groups, mixture, neighbours, probes
from app.noise import NOISE_DEFAULTS, detect_noise, plot_noise_report

D, C = 32, 12


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def planted():
    """1,200 clean images of 12 well separated classes, then: 100 symmetric mislabels, 60 off-topic images
    (own cluster, random labels), 8 exact and 4 near cross-class duplicates of clean images, and one
    ambiguous byte-identical pair halfway between two classes, filed under both."""
    rng = np.random.default_rng(0)
    mu = _unit(rng.standard_normal((C, D)))
    n0 = 1200
    true = np.repeat(np.arange(C), n0 // C)
    x = _unit(mu[true] + 0.15 * rng.standard_normal((n0, D)))
    labels = true.copy()
    kind = np.array(["clean"] * n0, dtype=object)
    hashes = [hashlib.sha1(f"img{i}".encode()).hexdigest() for i in range(n0)]
    perm = rng.permutation(n0)
    mis = perm[:100]
    labels[mis] = (true[mis] + rng.integers(1, C, len(mis))) % C
    kind[mis] = "symmetric"
    src = perm[100:112]                             # clean originals that get a copy under another class
    off_c = _unit(rng.standard_normal(D))
    x_off = _unit(off_c + 0.15 * rng.standard_normal((60, D)))
    lab_off = rng.integers(0, C, 60)
    x_dup = x[src].copy()
    x_dup[8:] = _unit(x_dup[8:] + 0.01 * rng.standard_normal((4, D)))   # near duplicates (cos > 0.99)
    lab_dup = (labels[src] + rng.integers(1, C, len(src))) % C
    h_dup = [hashes[i] if j < 8 else hashlib.sha1(f"near{j}".encode()).hexdigest() for j, i in enumerate(src)]
    amb = _unit(mu[0] + mu[1])[None].repeat(2, 0)
    X = np.concatenate([x, x_off, x_dup, amb]).astype(np.float16)
    y = np.concatenate([labels, lab_off, lab_dup, [0, 1]]).astype(np.int64)
    t = np.concatenate([true, -np.ones(60, int), labels[src], [-1, -1]])
    k = np.concatenate([kind, ["off_topic"] * 60, ["duplicate_other_class"] * len(src), ["ambiguous"] * 2])
    H = hashes + [hashlib.sha1(f"off{i}".encode()).hexdigest() for i in range(60)] + h_dup + ["amb", "amb"]
    return {"X": X, "y": y, "true": t, "kind": k, "H": H, "src": src, "mis": mis}


@pytest.fixture(scope="module")
def result(planted):
    p = planted
    return detect_noise(p["X"], p["y"], C, p["H"], dict(NOISE_DEFAULTS), seed=0)


# ----------------------------------------------------------------------------- output contract
def test_output_contract(planted, result):
    df = result
    n = len(planted["y"])
    assert list(df.columns) == ["clean_score", "weight", "flag", "suggested_label", "probe_label"]
    assert len(df) == n and (df.index == np.arange(n)).all()
    assert df["clean_score"].between(0, 1).all() and np.isfinite(df["clean_score"]).all()
    assert (df["weight"] >= 0).all() and np.isfinite(df["weight"]).all()
    assert set(df["flag"]) <= {"clean", "suspect_label", "off_topic", "duplicate"}
    s = df["suggested_label"].to_numpy()
    assert s.dtype.kind == "i" and ((s == -1) | ((s >= 0) & (s < C))).all()
    assert (s[df["flag"] == "clean"] == -1).all()
    assert (df.loc[df["flag"] != "clean", "weight"] == 0).all()
    assert not ((s >= 0) & (s == planted["y"])).any()      # a suggestion is never the given label
    probe = df["probe_label"].to_numpy()                    # the out-of-fold probe's top class, every image
    assert probe.dtype.kind == "i" and ((probe >= 0) & (probe < C)).all()
    assert (probe == planted["y"])[df["flag"] == "clean"].mean() > 0.8    # agrees with the labels it holds clean
    assert (s[s >= 0] == probe[s >= 0]).all() or (df["flag"] == "duplicate").any()   # suggestions are its top class


def test_deterministic_and_follows_input_order(planted, result):
    p = planted
    again = detect_noise(p["X"], p["y"], C, p["H"], {}, seed=0)
    pd.testing.assert_frame_equal(again, result)
    perm = np.random.default_rng(1).permutation(len(p["y"]))
    shuf = detect_noise(p["X"][perm], p["y"][perm], C, [p["H"][i] for i in perm], {}, seed=0)
    # a different row order changes the folds, not the verdicts on the planted noise
    agree = (shuf["flag"].to_numpy() != "clean") == (result["flag"].to_numpy()[perm] != "clean")
    assert agree.mean() > 0.97


def test_clean_data_is_mostly_left_alone():
    rng = np.random.default_rng(3)
    mu = _unit(rng.standard_normal((C, D)))
    y = rng.integers(0, C, 600)
    X = _unit(mu[y] + 0.15 * rng.standard_normal((600, D))).astype(np.float16)
    df = detect_noise(X, y, C, [str(i) for i in range(600)], {}, seed=0)
    assert (df["flag"] != "clean").mean() < 0.05
    assert (df["flag"] == "off_topic").sum() == 0


def test_small_and_degenerate_inputs():
    rng = np.random.default_rng(0)
    X = _unit(rng.standard_normal((30, 8))).astype(np.float16)
    y = rng.integers(0, 3, 30)
    df = detect_noise(X, y, 5, [str(i) for i in range(30)], {}, seed=0)   # classes 3, 4 absent
    assert len(df) == 30 and df["clean_score"].between(0, 1).all()
    assert (df["flag"] == "clean").all()            # too few images to learn what noise looks like
    one = detect_noise(X[:1], np.zeros(1, np.int64), 1, ["a"], {}, seed=0)
    assert list(one["flag"]) == ["clean"]
    with pytest.raises(ValueError):
        detect_noise(X, y + 5, 5, [str(i) for i in range(30)], {}, seed=0)
    empty = detect_noise(np.zeros((0, 8), np.float16), np.zeros(0, np.int64), 3, [], {}, seed=0)
    assert len(empty) == 0 and list(empty.columns) == ["clean_score", "weight", "flag", "suggested_label", "probe_label"]


# ----------------------------------------------------------------------------- planted noise found
def test_planted_mislabels_found_and_relabelled(planted, result):
    fl = result["flag"].to_numpy()
    mis = planted["mis"]
    assert (fl[mis] != "clean").mean() >= 0.9
    clean = np.nonzero(planted["kind"] == "clean")[0]
    assert (fl[clean] != "clean").mean() <= 0.05
    s = result["suggested_label"].to_numpy()[mis]
    given = s >= 0
    assert given.mean() >= 0.5 and (s[given] == planted["true"][mis][given]).mean() >= 0.95


def test_off_topic_cluster_flagged(planted, result):
    off = planted["kind"] == "off_topic"
    fl = result["flag"].to_numpy()
    assert (fl[off] == "off_topic").mean() >= 0.9
    assert (result["clean_score"].to_numpy()[off] < 0.2).mean() >= 0.9
    assert (fl[~off] == "off_topic").mean() <= 0.01


def test_cross_class_duplicates_resolved(planted, result):
    p = planted
    fl = result["flag"].to_numpy()
    dup = np.nonzero(p["kind"] == "duplicate_other_class")[0]
    assert (fl[dup] == "duplicate").all()                  # exact (8) and near (4) copies under a wrong class
    assert (result["weight"].to_numpy()[dup] == 0).all()
    assert (result["suggested_label"].to_numpy()[dup] == p["y"][p["src"]]).all()  # the kept copy's label
    assert (fl[p["src"]] == "clean").all()                 # the originals are kept
    amb = np.nonzero(p["kind"] == "ambiguous")[0]
    assert (fl[amb] == "duplicate").all()                  # no clear winner: the whole group goes


# ----------------------------------------------------------------------------- individual signals
def test_knn_exact_matches_brute_force_and_excludes_copies():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(_unit(rng.standard_normal((300, 16))).astype(np.float32))
    gid = np.arange(300)
    gid[5] = gid[7] = 5                                     # a byte-identical pair: never each other's neighbour
    v, i = neighbours.knn_exact(x, 10, gid, block=64, col_block=100)
    s = (x @ x.T).numpy()
    s[gid[:, None] == gid[None, :]] = -np.inf
    ref = np.sort(s, 1)[:, ::-1][:, :10]
    assert np.allclose(v.numpy(), ref, atol=1e-5)
    assert 7 not in i[5].tolist() and 5 not in i[7].tolist()


def test_knn_ivf_recall():
    rng = np.random.default_rng(0)
    mu = _unit(rng.standard_normal((40, 32)))
    x = torch.from_numpy(_unit(mu[rng.integers(0, 40, 4000)] + 0.1 * rng.standard_normal((4000, 32))).astype(np.float32))
    gid = np.arange(4000)
    _, ie = neighbours.knn_exact(x, 10, gid)
    _, ia = neighbours.knn_ivf(x, 10, gid, nprobe=6, cell_size=200)
    rec = np.mean([len(set(ie[j].tolist()) & set(ia[j].tolist())) / 10 for j in range(0, 4000, 5)])
    assert rec >= 0.9


def test_knn_vote_signal(planted):
    p = planted
    sig = nz.compute_signals(p["X"], p["y"], C, p["H"], {}, seed=0)
    q = sig["knn_q_y"]
    clean = p["kind"] == "clean"
    mis = np.zeros(len(q), bool)
    mis[p["mis"]] = True
    assert np.median(q[clean]) > 0.8 and np.median(q[mis]) < 0.1


def test_oof_lda_probe_and_prototypes(planted):
    p = planted
    sig = nz.compute_signals(p["X"], p["y"], C, p["H"], {"rounds": 1}, seed=0)
    clean = p["kind"] == "clean"
    mis = np.zeros(len(p["y"]), bool)
    mis[p["mis"]] = True
    # out of fold: a mislabelled image gets little probability for its wrong label, a clean one a lot
    assert np.median(sig["p_lda_y"][clean]) > 0.9 and np.median(sig["p_lda_y"][mis]) < 0.01
    assert (sig["top_class"][mis, 0] == p["true"][mis]).mean() > 0.95
    # prototypes: own-class cosine high for clean, low for mislabelled; max cosine low for off-topic
    assert sig["proto_cos_y"][clean].mean() - sig["proto_cos_y"][mis].mean() > 0.5
    off = p["kind"] == "off_topic"
    assert sig["max_proto_cos"][off].max() < np.quantile(sig["max_proto_cos"][clean], 0.01)


def test_trimmed_prototypes_resist_outliers():
    rng = np.random.default_rng(0)
    mu = _unit(rng.standard_normal((2, 16)))
    x = _unit(mu[0] + 0.1 * rng.standard_normal((100, 16)))
    x[::4] = _unit(mu[1] + 0.1 * rng.standard_normal((25, 16)))   # 25% foreign images filed under class 0
    x = torch.from_numpy(x.astype(np.float32))
    y = np.zeros(100, np.int64)
    fold = np.r_[np.zeros(50, int), np.ones(50, int)]
    w = np.ones(100)
    for f in range(2):
        plain = probes._robust_prototypes(x, y, w, fold, 2, 1, trim=0.0)[f][0][0].numpy()
        robust = probes._robust_prototypes(x, y, w, fold, 2, 1, trim=0.3)[f][0][0].numpy()
        assert robust @ mu[0] > 0.99 and robust @ mu[0] > plain @ mu[0] + 0.02


def test_mixture_recovers_planted_components():
    rng = np.random.default_rng(0)
    z = np.concatenate([
        np.c_[rng.normal(1.0, 0.2, 800), rng.normal(-0.5, 0.4, 800)],     # clean
        np.c_[rng.normal(1.0, 0.2, 150), rng.normal(-6.0, 1.0, 150)],     # mislabelled
        np.c_[rng.normal(0.1, 0.1, 50), rng.normal(-4.0, 0.5, 50)],       # off-topic (labels at chance, C=20)
    ])
    truth = np.r_[np.zeros(800), np.ones(150), 2 * np.ones(50)]
    post, info, off_z1 = mixture._fit_mixture(z, np.zeros(1000, int), 20, 0.0, 1.5)
    assert (post.argmax(1) == truth).mean() > 0.97
    assert (off_z1[truth == 2] > 0.5).all() and (off_z1[truth < 2] > 0.5).mean() < 0.01
    # without an off-topic cluster the third component is rejected
    post2, info2, off2 = mixture._fit_mixture(z[:950], np.zeros(950, int), 20, 0.0, 1.5)
    assert 2 not in info2["components"] and (post2[:, 2] == 0).all()
    assert (post2.argmax(1) == truth[:950]).mean() > 0.97


def test_folds_keep_duplicate_groups_together_and_stratify():
    labels = np.repeat(np.arange(4), 25)
    groups = np.arange(100)
    groups[[3, 40, 77]] = 3
    fold = dup_groups._make_folds(labels, groups, 5, seed=0)
    assert len(set(fold[[3, 40, 77]])) == 1
    for c in range(4):
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 2


def test_duplicate_groups_exact_and_near():
    labels = np.array([0, 1, 2, 3])
    hash_gid = np.array([0, 0, 1, 2])                        # 0 and 1 byte-identical
    knn_v = np.array([[0.5], [0.5], [0.995], [0.995]])
    knn_i = np.array([[2], [2], [3], [2]])                   # 2 and 3 near-identical features
    g = dup_groups._duplicate_groups(labels, hash_gid, knn_v, knn_i, near_cos=0.98, max_group=32)
    assert g[0] == g[1] and g[2] == g[3] and g[0] != g[2]


# ----------------------------------------------------------------------------- report figure
def test_plot_noise_report(tmp_path, planted, result):
    from PIL import Image

    n = len(result)
    paths = []
    for i in range(n):
        pth = tmp_path / f"{i}.jpg"
        if i % 3 == 0:
            Image.new("L" if i % 2 else "RGB", (40, 30), color=i % 255).save(pth)
        elif i % 3 == 1:
            pth.write_bytes(b"not an image")                  # unreadable: drawn as a placeholder
        paths.append(str(pth))                               # i % 3 == 2: missing file
    df = result.copy()
    df.insert(0, "given_label", planted["y"])
    out = tmp_path / "rep" / "noise_report.png"
    plot_noise_report(df, paths, [f"{c:04d}" for c in range(C)], str(out))
    assert out.exists() and out.stat().st_size > 10_000
    # also accepts the bare detect_noise frame and CSV-style string labels
    csv_like = df.assign(given_label=[f"{c:04d}" for c in planted["y"]],
                         suggested_label=[f"{s:04d}" if s >= 0 else "" for s in df["suggested_label"]])
    plot_noise_report(csv_like, paths, [f"{c:04d}" for c in range(C)], str(tmp_path / "b.png"))
    plot_noise_report(result, paths, None, str(tmp_path / "c.png"))
    assert (tmp_path / "b.png").exists() and (tmp_path / "c.png").exists()
