"""Balanced-prior inference: one model, one forward pass per image, one CSV row per test image.

logits = model(x) - tau * log(train prior); the prediction is their argmax. What would make the
CSV unwritable is found before any model work: an OUT_DIR this process cannot write, test file
names a `name, label` row cannot hold. The CSV is checked (one row per test image, no duplicates,
only known class ids) and written whole or not at all.
"""
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from .data import ImageDataset, eval_transform
from .model import load_model_file
from .outputs import OutputError, atomic_write, check_writable
from .report import peak_rss_gib, write_json
from .runtime import batched_pass, make_accelerator
from .scan import list_test_images

log = logging.getLogger("app")


def csv_name_problem(name: str) -> str | None:
    """Why `name` cannot be the first field of a `name, label` row, else None. A comma or a double
    quote is CSV syntax (separator, quoting); a line break ends the row; leading or trailing
    whitespace is stripped by CSV readers (the scorer reads with skipinitialspace), so the name
    would not match its image; undecodable bytes in a file name cannot be written as UTF-8."""
    if "," in name:
        return "comma"
    if '"' in name:
        return "double quote"
    if name.splitlines() != [name]:
        return "line break"
    if name != name.strip():
        return "leading or trailing whitespace"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    return None


def check_csv_names(names) -> None:
    """Every name the CSV cannot hold, all in one error."""
    bad = [(n, why) for n in names if (why := csv_name_problem(n))]
    if bad:
        raise OutputError(
            f"{len(bad)} test file name(s) cannot be written to submission.csv, whose rows are `name, label`: "
            "a name must have no comma, double quote or line break, no leading or trailing whitespace, and "
            "be valid UTF-8. Rename these files (or correct --list), then rerun:\n"
            + "\n".join(f"  {n!r}: {why}" for n, why in bad))


def validate_submission(table: pd.DataFrame, names, classes) -> None:
    problems = []
    if len(table) != len(names) or set(table["image"]) != set(names):
        problems.append(f"{len(table)} rows for {len(names)} test images")
    if table["image"].duplicated().any():
        problems.append(f"duplicated names: {table.loc[table['image'].duplicated(), 'image'].tolist()[:5]}")
    unknown = set(table["label"]) - set(classes)
    if unknown:
        problems.append(f"unknown labels: {sorted(unknown)[:5]}")
    if problems:
        raise ValueError("submission check failed: " + "; ".join(problems))


def write_submission(table: pd.DataFrame, path) -> None:
    """`name.jpg, 0001` per line, in the table's order (sorted by name), no header, UTF-8."""
    with atomic_write(path) as f:
        for name, label in zip(table["image"], table["label"]):
            f.write(f"{name}, {label}\n")


def infer(test_dir, out_dir, cfg: dict, model_path=None, list_file=None) -> dict:
    t0 = time.perf_counter()
    # everything that would stop the run at its end is checked first, before any model work
    out_dir = check_writable(out_dir)
    model_path = Path(model_path) if model_path else out_dir / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {model_path} (run run_train.sh first, or pass --model)")
    files = list_test_images(test_dir, list_file)
    names = files.names
    if not names:
        raise ValueError(f"no test images found in {list_file or test_dir}"
                         + (f" ({len(files.hidden)} hidden files skipped)" if files.hidden else ""))
    check_csv_names(names)

    icfg = cfg["infer"]
    accelerator = make_accelerator(cfg)
    model, meta = load_model_file(model_path)
    model = model.to(accelerator.device)
    classes = meta["classes"]
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
        write_submission(table, out_dir / "submission.csv")
        unreadable = [n for n, good in zip(names, ok) if not good]
        if unreadable:
            log.warning("%d test images could not be decoded; each still has a row (prediction for a "
                        "blank image), listed in infer_report.json", len(unreadable))
        report = {"model": str(model_path), "model_arch": meta["arch"],
                  "weights_sha256": meta["weights_sha256"], "model_code_version": meta["code_version"],
                  "test_images": len(names), "rows_written": len(table), "unreadable": unreadable,
                  "hidden_files_skipped": len(files.hidden), "hidden_files": files.hidden,
                  "list_duplicates": files.duplicates,
                  "tau": icfg["tau"], "flip_tta": icfg["flip_tta"],
                  "predicted_class_counts": table["label"].value_counts().describe().round(2).to_dict(),
                  "seconds": round(time.perf_counter() - t0, 2), "peak_rss_gib": peak_rss_gib(),
                  "images_per_second": round(len(names) / max(1e-9, time.perf_counter() - t0), 1)}
        write_json(out_dir / "infer_report.json", report)
        log.info("submission.csv: %d rows -> %s", len(table), out_dir / "submission.csv")
    return report
