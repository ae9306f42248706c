"""TECH_REPORT.md section 4.4: the noise-detection table and the audit figure's scores.

Score the noise stage against a truth file, next to two simple detectors; and measure it at scale.

Examples (from the repo root):
  # run the detector on cached features, score it and the baselines
  .venv/bin/python bench/score_noise.py --features runs/noise/flowers_proxy_feats.npz \
      --truth ../shared/data/flowers102-noisy/train_truth.csv --out runs/noise/flowers
  # score a noise_scores.csv written by `python -m app audit` (baselines need --features too)
  .venv/bin/python bench/score_noise.py --scores OUT_DIR/noise_scores.csv --truth .../train_truth.csv
  # 300k x 512 fp16, 1,500 classes: wall time and peak RSS of detect_noise
  .venv/bin/python bench/score_noise.py --synthetic-scale --out runs/noise/scale
  # build the proxy feature file the examples above read
  .venv/bin/python bench/score_noise.py --extract ../shared/data/flowers102-noisy/train \
      --weights ../shared/models/proxy-vit-s8-64.pt --features runs/noise/flowers_proxy_feats.npz

The truth file is used ONLY here, for scoring; nothing in it reaches the detector.
Paths are matched on their last two components (<class>/<file>), so TRAIN_DIR-relative paths in
noise_scores.csv match the dataset-root-relative ones in train_truth.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from app.studies.make_noisy import read_truth, truth_key  # noqa: E402

KINDS = ["confusable", "symmetric", "off_topic", "duplicate_other_class"]


def load_truth(truth_csv: str, keys) -> pd.DataFrame:
    t = read_truth(truth_csv).set_index("path", drop=False)
    missing = [k for k in keys if k not in t.index]
    if missing:
        raise SystemExit(f"{len(missing)} scored paths not in the truth file, e.g. {missing[:3]}")
    return t.loc[list(keys)]


# ----------------------------------------------------------------------------- metrics
def score_flags(flagged: np.ndarray, kind: np.ndarray, suggested=None, true_label=None) -> dict:
    flagged = np.asarray(flagged, bool)
    noisy = kind != "clean"
    tp = int((flagged & noisy).sum())
    n_flag = int(flagged.sum())
    p = tp / n_flag if n_flag else 0.0
    r = tp / max(int(noisy.sum()), 1)
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    out = {"flagged": n_flag, "precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4),
           "clean_flagged_rate": round(float(flagged[~noisy].mean()) if (~noisy).any() else 0.0, 4)}
    out["recall_by_kind"] = {k: round(float(flagged[kind == k].mean()), 4) for k in KINDS if (kind == k).any()}
    if suggested is not None:
        s = np.asarray(suggested, np.int64)
        m = s >= 0
        out["suggested_n"] = int(m.sum())
        out["suggested_acc"] = round(float((s[m] == true_label[m]).mean()), 4) if m.any() else None
    return out


def best_threshold(score_noisy: np.ndarray, kind: np.ndarray) -> tuple[np.ndarray, float]:
    """Oracle: flag the top-k by score with the k that maximises F1 against the truth (reported as such)."""
    noisy = kind != "clean"
    o = np.argsort(-score_noisy, kind="stable")
    tp = np.cumsum(noisy[o])
    k = np.arange(1, len(o) + 1)
    f1 = 2 * tp / (k + noisy.sum())
    kb = int(f1.argmax()) + 1
    fl = np.zeros(len(o), bool)
    fl[o[:kb]] = True
    return fl, float(score_noisy[o[kb - 1]])


def auc(score_noisy: np.ndarray, kind: np.ndarray) -> float:
    pos = kind != "clean"
    r = pd.Series(score_noisy).rank().to_numpy()
    n1, n0 = pos.sum(), (~pos).sum()
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def run_baselines(feats: dict, kind: np.ndarray, seed: int, with_oof: bool = True) -> dict:
    from noise_baselines import estimate_noise_rate_gmm, probe_in_sample, probe_oof, small_loss_flags

    X, y = feats["features"], feats["labels"].astype(np.int64)
    C = int(y.max()) + 1 if "class_names" not in feats else len(feats["class_names"])
    res = {}
    t0 = time.time()
    P = probe_in_sample(X, y, C, seed=seed)
    loss = -np.log(np.clip(P[np.arange(len(y)), y], 1e-12, None))
    rate = estimate_noise_rate_gmm(loss)
    res["small_loss_gmm_rate"] = {**score_flags(small_loss_flags(P, y, rate), kind),
                                  "rule": f"flag top {rate:.3f} by in-sample CE loss (rate = 2-GMM weight of the high-loss component)",
                                  "auc": round(auc(loss, kind), 4)}
    fl, thr = best_threshold(loss, kind)
    res["small_loss_best"] = {**score_flags(fl, kind), "rule": f"oracle best threshold (loss >= {thr:.3f})"}
    dis = P.argmax(1) != y
    res["single_probe_disagree"] = {**score_flags(dis, kind), "rule": "argmax of the in-sample probe != given label"}
    res["_baseline_s"] = round(time.time() - t0, 1)
    if with_oof:
        Po = probe_oof(X, y, C, seed=seed)
        py = Po[np.arange(len(y)), y]
        res["oof5_logistic_p<0.01"] = {**score_flags(py < 0.01, kind), "rule": "5-fold OOF plain-CE probe, p(given) < 0.01 (models/README reference)",
                                        "auc": round(auc(-np.log(py + 1e-12), kind), 4)}
        fl, thr = best_threshold(-np.log(py + 1e-12), kind)
        res["oof5_logistic_best"] = {**score_flags(fl, kind), "rule": f"oracle best threshold (p < {np.exp(-thr):.4f})"}
    return res


def devtest_probe(feats: dict, test_npz: str, kind: np.ndarray, df: pd.DataFrame, seeds=(0, 1)) -> dict:
    """Downstream check on frozen features: a plain-CE linear probe trained with per-sample weights, scored on
    the dev-test split (its labels are used only for scoring). Weighted class prior = sum of weights."""
    import torch

    te = np.load(test_npz, allow_pickle=False)
    assert [str(c) for c in te["class_names"]] == [str(c) for c in feats["class_names"]]
    Xtr, y = feats["features"].astype(np.float32), feats["labels"].astype(np.int64)
    m, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    A = torch.from_numpy((Xtr - m) / sd)
    B = torch.from_numpy((te["features"].astype(np.float32) - m) / sd)
    yte = te["labels"].astype(np.int64)
    C = len(feats["class_names"])

    def run(w, yy):
        acc, accp = [], []
        for seed in seeds:
            torch.manual_seed(seed)
            h = torch.nn.Linear(A.shape[1], C)
            torch.nn.init.normal_(h.weight, std=0.01)
            torch.nn.init.zeros_(h.bias)
            opt = torch.optim.Adam(h.parameters(), lr=1e-2)
            wt, yt = torch.from_numpy(np.asarray(w, np.float32)), torch.from_numpy(yy)
            for _ in range(300):
                opt.zero_grad()
                loss = (torch.nn.functional.cross_entropy(h(A), yt, reduction="none") * wt).sum() / wt.sum()
                (loss + 1e-4 * h.weight.pow(2).sum()).backward()
                opt.step()
            with torch.no_grad():
                z = h(B).numpy()
            prior = np.bincount(yy, weights=w, minlength=C) + 1e-6
            acc.append(float((z.argmax(1) == yte).mean()))
            accp.append(float(((z - np.log(prior / prior.sum())).argmax(1) == yte).mean()))
        return {"acc": round(float(np.mean(acc)), 4), "acc_prior_corrected": round(float(np.mean(accp)), 4)}

    flag = df["flag"].to_numpy()
    sugg = df["suggested_label"].to_numpy()
    return {
        "all images, weight 1 (no noise stage)": run(np.ones(len(y)), y),
        "noise stage weights (default)": run(df["weight"].to_numpy(), y),
        "noise stage, hard: drop flagged, rest 1": run((flag == "clean").astype(float), y),
        "noise stage weights + suggested labels": run(np.where(sugg >= 0, 1.0, df["weight"].to_numpy()), np.where(sugg >= 0, sugg, y)),
        "oracle: truly clean images only": run((kind == "clean").astype(float), y),
    }


def markdown_table(rows: dict) -> str:
    head = "| detector | flagged | precision | recall | F1 | " + " | ".join(f"recall {k}" for k in KINDS) + " | clean flagged | suggested acc (n) |"
    sep = "|" + "---|" * (6 + len(KINDS))
    lines = [head, sep]
    for name, m in rows.items():
        if name.startswith("_"):
            continue
        rk = " | ".join(f"{m['recall_by_kind'].get(k, float('nan')):.3f}" for k in KINDS)
        sa = f"{m['suggested_acc']:.3f} ({m['suggested_n']})" if m.get("suggested_acc") is not None else "–"
        lines.append(f"| {name} | {m['flagged']} | {m['precision']:.3f} | {m['recall']:.3f} | **{m['f1']:.3f}** | {rk} | {m['clean_flagged_rate']:.3f} | {sa} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- peak memory
class PeakRSS:
    """Samples /proc/self/status VmRSS every 50 ms (ru_maxrss also reported; it covers the whole process)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __exit__(self, *a):
        self._stop.set()
        self.t.join()
        self.peak = max(self.peak, self._rss())


def synthetic_features(n: int, d: int, classes: int, seed: int = 0, noise_rate: float = 0.2,
                       offtopic_rate: float = 0.05, dup_rate: float = 0.01):
    """Long-tailed synthetic fp16 features with planted mislabels, an off-topic cluster and cross-class
    byte-identical duplicates. Returns (features fp16, labels, hashes, kind)."""
    rng = np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, classes + 1) ** 0.6
    freq /= freq.sum()
    true = rng.choice(classes, size=n, p=freq)
    mu = rng.standard_normal((classes, d)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    kind = np.array(["clean"] * n, dtype=object)
    feats = np.empty((n, d), np.float16)
    blk = 50000
    for b0 in range(0, n, blk):
        b1 = min(n, b0 + blk)
        f = mu[true[b0:b1]] * 1.0 + rng.standard_normal((b1 - b0, d)).astype(np.float32) * (1.1 / np.sqrt(d))
        feats[b0:b1] = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float16)
    labels = true.copy()
    idx = rng.permutation(n)
    n_off, n_noise, n_dup = int(offtopic_rate * n), int(noise_rate * n), int(dup_rate * n)
    off = idx[:n_off]
    off_mu = rng.standard_normal((20, d)).astype(np.float32)
    off_mu /= np.linalg.norm(off_mu, axis=1, keepdims=True)
    f = off_mu[rng.integers(0, 20, n_off)] + rng.standard_normal((n_off, d)).astype(np.float32) * (1.1 / np.sqrt(d))
    feats[off] = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float16)
    labels[off] = rng.choice(classes, size=n_off, p=freq)
    kind[off] = "off_topic"
    mis = idx[n_off:n_off + n_noise]
    labels[mis] = (true[mis] + rng.integers(1, classes, n_noise)) % classes
    kind[mis] = "symmetric"
    hashes = [f"{i:016x}" for i in range(n)]
    src = idx[n_off + n_noise:n_off + n_noise + n_dup]
    dst = idx[n_off + n_noise + n_dup:n_off + n_noise + 2 * n_dup]
    feats[dst] = feats[src]
    labels[dst] = (labels[src] + rng.integers(1, classes, n_dup)) % classes
    for s_, d_ in zip(src.tolist(), dst.tolist()):
        hashes[d_] = hashes[s_]
    kind[dst] = "duplicate_other_class"
    return feats, labels.astype(np.int64), hashes, kind.astype(str)


def ablation(a, cfg):
    """What each signal and each combination choice is worth (AUC of the noisy-vs-clean ranking is
    threshold-free; 'best F1' uses the truth to pick the threshold and is an upper bound, not a result)."""
    from app.noise import NOISE_DEFAULTS, compute_signals, detect_noise

    z = np.load(a.features, allow_pickle=False)
    X, y, names = z["features"], z["labels"].astype(np.int64), [str(c) for c in z["class_names"]]
    keys = [truth_key(p) for p in z["paths"]]
    kind = load_truth(a.truth, keys)["noise"].to_numpy()
    C = len(names)
    base = {**NOISE_DEFAULTS, **cfg}
    sig = compute_signals(X, y, C, list(z["hashes"]), base, a.seed)
    off = kind == "off_topic"
    rows = []

    def add(name, s_noisy):
        fl, _ = best_threshold(s_noisy, kind)
        m = score_flags(fl, kind)
        rows.append({"signal / variant": name, "AUC noisy": round(auc(s_noisy, kind), 4),
                     "AUC off-topic": round(auc(s_noisy, np.where(off, "x", "clean")), 4),
                     "best-F1 (oracle thr)": m["f1"], "off-topic recall @best": m["recall_by_kind"]["off_topic"],
                     "F1 (flags)": None})

    add("LDA OOF -log p(y)", -np.log(sig["p_lda_y"] + 1e-12))
    add("kNN vote -log q(y)", -np.log(sig["knn_q_y"] + 1e-12))
    add("prototype cos to own class (neg)", -sig["proto_cos_y"])
    add("max prototype cos (neg)", -sig["max_proto_cos"])
    add("mixture 1-posterior(clean) [default]", 1 - sig["post_clean"])
    variants = {
        "default": {},
        "+kNN in label evidence (a=0.25)": {"knn_weight": 0.25},
        "+prototype softmax in label evidence (b=0.25)": {"proto_weight": 0.25},
        "+both (a=b=0.25)": {"knn_weight": 0.25, "proto_weight": 0.25},
        "1 round (no reweighted refit)": {"rounds": 1},
        "per-class mixing weights (strength 20)": {"class_prior_strength": 20.0},
        "softmax probe instead of LDA": {"probe": "logistic"},
        "no off-topic component (label evidence only)": {"offtopic_min_sep": 1e9},
        "1 clean component instead of 2": {"mixture_clean_components": 1},
        "temperature without noise floor": {"temperature_noise_floor": False},
        "flag_threshold 0.5 (equal costs)": {"flag_threshold": 0.5},
        "flag_threshold 0.2": {"flag_threshold": 0.2},
    }
    for name, v in variants.items():
        t0 = time.time()
        df = detect_noise(X, y, C, list(z["hashes"]), {**base, **v}, a.seed)
        m = score_flags(df["flag"].to_numpy() != "clean", kind)
        rows.append({"signal / variant": "detect_noise: " + name,
                     "AUC noisy": round(auc(1 - df["clean_score"].to_numpy(), kind), 4),
                     "AUC off-topic": round(auc(1 - df["clean_score"].to_numpy(), np.where(off, "x", "clean")), 4),
                     "best-F1 (oracle thr)": None, "off-topic recall @best": None,
                     "F1 (flags)": m["f1"], "P": m["precision"], "R": m["recall"],
                     "off-topic recall": m["recall_by_kind"]["off_topic"], "s": round(time.time() - t0, 1)})
    tab = pd.DataFrame(rows)
    tab.to_csv(os.path.join(a.out, "ablation.csv"), index=False)
    print(_md(tab))


def _md(tab: pd.DataFrame) -> str:
    cols = list(tab.columns)
    fmt = lambda v: "–" if v is None or (isinstance(v, float) and np.isnan(v)) else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in tab.itertuples(index=False)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", help="npz with features, labels, paths, hashes, class_names")
    ap.add_argument("--scores", help="noise_scores.csv to score instead of running the detector")
    ap.add_argument("--truth", default=str(ROOT.parent / "shared/data/flowers102-noisy/train_truth.csv"))
    ap.add_argument("--out", default=str(ROOT / "runs/noise/flowers"), help="output folder")
    ap.add_argument("--cfg", default="{}", help="JSON overrides of NOISE_DEFAULTS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-oof-reference", action="store_true")
    ap.add_argument("--report-png", action="store_true", help="also draw noise_report.png")
    ap.add_argument("--ablation", action="store_true", help="per-signal AUC / best-F1 and combination variants")
    ap.add_argument("--devtest", help="test-feature npz: frozen linear probe dev-test accuracy with / without the weights")
    ap.add_argument("--synthetic-scale", action="store_true")
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--classes", type=int, default=1500)
    ap.add_argument("--extract", help="train dir: build the proxy feature cache at --features and exit")
    ap.add_argument("--weights", default=str(ROOT.parent / "shared/models/proxy-vit-s8-64.pt"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    cfg = json.loads(a.cfg)

    if a.extract:
        from noise_baselines import extract_proxy_features
        extract_proxy_features(a.extract, a.weights, a.features)
        return

    from app.noise import NOISE_DEFAULTS, detect_noise

    if a.synthetic_scale:
        t0 = time.time()
        X, y, h, kind = synthetic_features(a.n, a.d, a.classes, seed=a.seed)
        gen_s = time.time() - t0
        cfg = {**cfg, "verbose": True}
        with PeakRSS() as pk:
            t0 = time.time()
            df = detect_noise(X, y, a.classes, h, cfg, a.seed)
            wall = time.time() - t0
        res = {"n": a.n, "d": a.d, "classes": a.classes, "threads": int(__import__("torch").get_num_threads()),
               "cpu_count": os.cpu_count(), "wall_s": round(wall, 1), "generate_s": round(gen_s, 1),
               "rss_before_gib": round(pk.base / 2**30, 2), "peak_rss_gib": round(pk.peak / 2**30, 2),
               "peak_rss_increase_gib": round((pk.peak - pk.base) / 2**30, 2),
               "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
               "input_features_gib": round(X.nbytes / 2**30, 3),
               "timings": {k: round(v, 1) for k, v in df.attrs["info"]["timings"].items()},
               "synthetic_detection": score_flags(df["flag"].to_numpy() != "clean", kind)}
        if a.n > NOISE_DEFAULTS["knn_exact_max_n"]:
            # recall of the approximate neighbour search, on 2,000 random queries (outside the timed part)
            import torch
            from app.noise.neighbours import _to_float_tensor, knn_ivf
            x = _to_float_tensor(X)
            k = NOISE_DEFAULTS["knn_k"]
            gid = np.arange(a.n)
            t0 = time.time()
            _, ia = knn_ivf(x, k, gid, nprobe=NOISE_DEFAULTS["ivf_nprobe"], cell_size=NOISE_DEFAULTS["ivf_cell_size"], seed=a.seed)
            q = np.random.default_rng(0).choice(a.n, 2000, replace=False)
            s = x[q] @ x.T
            s[torch.arange(2000), torch.from_numpy(q)] = -float("inf")
            ie = s.topk(k, dim=1).indices.numpy()
            rec = float(np.mean([len(set(ie[j]) & set(ia[q[j]].tolist())) / k for j in range(2000)]))
            res["ivf_recall_at_k"] = round(rec, 4)
            res["ivf_s"] = round(time.time() - t0, 1)
        print(json.dumps(res, indent=1))
        with open(os.path.join(a.out, "scale.json"), "w") as f:
            json.dump(res, f, indent=1)
        return

    if a.ablation:
        ablation(a, cfg)
        return

    feats, df = None, None
    if a.features:
        z = np.load(a.features, allow_pickle=False)
        feats = {k: z[k] for k in z.files}
    rows = {}
    if a.scores:
        sc = pd.read_csv(a.scores, keep_default_na=False)
        keys = sc["path"].map(truth_key).tolist()
        t = load_truth(a.truth, keys)
        kind = t["noise"].to_numpy()
        names = sorted(pd.read_csv(a.truth, dtype=str)["given_label"].unique())
        true = np.array([names.index(v) if v in names else -1 for v in t["true_label"]])
        sugg = pd.to_numeric(sc["suggested_label"].replace("", -1), errors="coerce").fillna(-1).astype(int).to_numpy()
        rows["noise_stage (csv)"] = score_flags(sc["flag"].to_numpy() != "clean", kind, sugg, true)
        if feats is not None:
            order = pd.Series(np.arange(len(feats["paths"])), index=[truth_key(p) for p in feats["paths"]])
            feats = {k: (v[order.loc[keys].to_numpy()] if k in ("features", "labels", "paths", "hashes") else v)
                     for k, v in feats.items()}
    else:
        if feats is None:
            raise SystemExit("need --features or --scores")
        keys = [truth_key(p) for p in feats["paths"]]
        t = load_truth(a.truth, keys)
        kind = t["noise"].to_numpy()
        names = [str(c) for c in feats["class_names"]]
        true = np.array([names.index(v) if v in names else -1 for v in t["true_label"]])
        C = len(names)
        full_cfg = {**NOISE_DEFAULTS, **cfg}
        t0 = time.time()
        df = detect_noise(feats["features"], feats["labels"], C, list(feats["hashes"]), full_cfg, a.seed)
        det_s = time.time() - t0
        rows["noise_stage"] = score_flags(df["flag"].to_numpy() != "clean", kind,
                                          df["suggested_label"].to_numpy(), true)
        rows["noise_stage"]["auc_1-clean_score"] = round(auc(1 - df["clean_score"].to_numpy(), kind), 4)
        rows["noise_stage"]["detect_noise_s"] = round(det_s, 1)
        rows["noise_stage"]["info"] = df.attrs.get("info")
        flag = df["flag"].to_numpy()
        rows["noise_stage"]["flag_precision"] = {
            "off_topic (is off-topic)": round(float((kind[flag == "off_topic"] == "off_topic").mean()), 4) if (flag == "off_topic").any() else None,
            "duplicate (is noisy)": round(float((kind[flag == "duplicate"] != "clean").mean()), 4) if (flag == "duplicate").any() else None,
            "suspect_label (is noisy)": round(float((kind[flag == "suspect_label"] != "clean").mean()), 4) if (flag == "suspect_label").any() else None,
        }
        out = pd.DataFrame({"path": keys, "given_label": [names[i] for i in feats["labels"]],
                            "clean_score": df["clean_score"].round(5), "weight": df["weight"].round(5),
                            "flag": df["flag"],
                            "suggested_label": [names[s] if s >= 0 else "" for s in df["suggested_label"]]})
        out.to_csv(os.path.join(a.out, "noise_scores.csv"), index=False)
        if a.report_png:
            from app.noise import plot_noise_report
            root = Path(a.truth).parent / "train"
            plot_noise_report(out, [str(root / k) for k in keys], names, os.path.join(a.out, "noise_report.png"))
    if a.devtest and feats is not None and df is not None:
        rows_dt = devtest_probe(feats, a.devtest, kind, df)
        res_dt = {k: v for k, v in rows_dt.items()}
        with open(os.path.join(a.out, "devtest.json"), "w") as f:
            json.dump(res_dt, f, indent=1)
        print("\nfrozen linear probe on dev-test (top-1, logits - log weighted class prior; mean of 2 seeds):")
        for k, v in res_dt.items():
            print(f"  {k:45s} {v['acc_prior_corrected']:.4f}  (no correction {v['acc']:.4f})")
    if feats is not None and not a.no_baselines:
        rows.update(run_baselines(feats, kind, a.seed, with_oof=not a.no_oof_reference))
    res = {"truth": a.truth, "n": len(kind), "noisy_rate": round(float((kind != "clean").mean()), 4),
           "cfg": cfg, "seed": a.seed, "detectors": rows}
    with open(os.path.join(a.out, "score.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "info"} if isinstance(v, dict) else v
                      for k, v in rows.items()}, indent=1, default=str))
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
