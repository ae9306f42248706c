"""Balanced-prior inference: one model, one forward pass per image, one CSV row per test image.

logits = model(x) - tau * log(train prior); the prediction is their argmax. The CSV is checked
(one row per test image, no duplicates, only known class ids) and written atomically.
"""
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from .data import ImageDataset, eval_transform
from .model import load_model_file
from .report import peak_rss_gib, write_json
from .runtime import batched_pass, make_accelerator
from .scan import list_test_images

log = logging.getLogger("app")


def validate_submission(table: pd.DataFrame, names, classes) -> None:
    problems = []
    if len(table) != len(names) or set(table["image"]) != set(names):
        problems.append(f"{len(table)} rows for {len(names)} test images")
    if table["image"].duplicated().any():
        problems.append(f"duplicated names: {table.loc[table['image'].duplicated(), 'image'].tolist()[:5]}")
    unknown = set(table["label"]) - set(classes)
    if unknown:
        problems.append(f"unknown labels: {sorted(unknown)[:5]}")
    if any("," in n or "\n" in n for n in table["image"]):
        problems.append("an image name contains a comma or newline")
    if problems:
        raise ValueError("submission check failed: " + "; ".join(problems))


def write_submission(table: pd.DataFrame, path) -> None:
    """`name.jpg, 0001` per line, sorted by name, no header; temp file + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="\n") as f:
        for name, label in zip(table["image"], table["label"]):
            f.write(f"{name}, {label}\n")
    tmp.replace(path)


def infer(test_dir, out_dir, cfg: dict, model_path=None, list_file=None) -> dict:
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    model_path = Path(model_path) if model_path else out_dir / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {model_path} (run run_train.sh first, or pass --model)")
    icfg = cfg["infer"]
    accelerator = make_accelerator(cfg)
    model, meta = load_model_file(model_path)
    model = model.to(accelerator.device)
    classes = meta["classes"]
    names = list_test_images(test_dir, list_file)
    if not names:
        raise ValueError(f"no test images found in {test_dir}" + (f" / {list_file}" if list_file else ""))
    pre = meta["preprocess"]
    dataset = ImageDataset([Path(test_dir) / n for n in names], eval_transform(pre), pre["image_size"])

    def predict(x):
        logits = model.balanced_logits(x, icfg["tau"])
        if icfg["flip_tta"]:
            logits = 0.5 * (logits + model.balanced_logits(torch.flip(x, dims=[3]), icfg["tau"]))
        return logits

    logits, ok = batched_pass(predict, dataset, accelerator, icfg["batch_size"], cfg["num_workers"],
                              "infer: test images")
    report = None
    if accelerator.is_main_process:
        table = pd.DataFrame({"image": names, "label": [classes[i] for i in logits.argmax(1)]})
        table = table.sort_values("image", kind="stable").reset_index(drop=True)
        validate_submission(table, names, classes)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_submission(table, out_dir / "submission.csv")
        unreadable = [n for n, good in zip(names, ok) if not good]
        if unreadable:
            log.warning("%d test images could not be decoded; each still has a row (prediction for a "
                        "blank image), listed in infer_report.json", len(unreadable))
        report = {"model": str(model_path), "model_arch": meta["arch"],
                  "weights_sha256": meta["weights_sha256"], "model_code_version": meta["code_version"],
                  "test_images": len(names), "rows_written": len(table), "unreadable": unreadable,
                  "tau": icfg["tau"], "flip_tta": icfg["flip_tta"],
                  "predicted_class_counts": table["label"].value_counts().describe().round(2).to_dict(),
                  "seconds": round(time.perf_counter() - t0, 2), "peak_rss_gib": peak_rss_gib(),
                  "images_per_second": round(len(names) / max(1e-9, time.perf_counter() - t0), 1)}
        write_json(out_dir / "infer_report.json", report)
        log.info("submission.csv: %d rows -> %s", len(table), out_dir / "submission.csv")
    return report
