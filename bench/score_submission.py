"""Score a submission.csv against a labels CSV (image,label): top-1 and per-class mean accuracy.

    python bench/score_submission.py OUT/submission.csv ../shared/data/flowers102-noisy/test_labels.csv
"""
import argparse
import json

import pandas as pd


def score(submission, labels) -> dict:
    pred = pd.read_csv(submission, header=None, names=["image", "pred"], dtype=str, skipinitialspace=True)
    truth = pd.read_csv(labels, dtype=str)
    merged = truth.merge(pred, on="image", how="left")
    merged["correct"] = merged["pred"] == merged["label"]
    return {"images": len(merged), "missing_rows": int(merged["pred"].isna().sum()),
            "top1": round(float(merged["correct"].mean()), 4),
            "macro": round(float(merged.groupby("label")["correct"].mean().mean()), 4)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("submission")
    ap.add_argument("labels")
    args = ap.parse_args()
    print(json.dumps(score(args.submission, args.labels)))
