"""Score a submission.csv against a labels CSV (image,label): top-1 and per-class mean accuracy.

    python bench/score_submission.py OUT/submission.csv ../shared/data/flowers102-noisy/test_labels.csv

The scoring itself is `app.studies.bench.score`, the one `python -m app bench` uses.
"""
import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.studies.bench import score  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("submission")
    ap.add_argument("labels")
    args = ap.parse_args()
    labels = pd.read_csv(args.labels, dtype=str)
    s = score(args.submission, labels, tail=set())
    print(json.dumps({"images": len(labels), "missing_rows": s["missing_rows"],
                      "top1": round(s["top1"], 4), "macro": round(s["macro"], 4)}))
