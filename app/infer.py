"""Balanced-prior inference: one model, one CSV row per test image.

logits = model(x) - tau * log(train prior); the prediction is their argmax. By default one forward
pass per image. Two test-time options, both off by default:

- `infer.tta` (`--tta`): `flip` averages the logits of the image and its horizontal mirror;
  `multiscale` averages them over the input sizes `infer.tta_scales` x the trained size, each with
  and without the mirror. One model, one set of weights, its logits averaged over views of the same
  image (organisers' written ruling of 2026-08-31: flip / multi-scale TTA compliant).
- `infer.balance_test_prior` (`--balance-test-prior`): a class bias fitted on the test images'
  logits so that the predicted class distribution comes out uniform. It fits a parameter on TEST
  data (a rule-3 risk): a warning is printed and the report says so.

Every file under TEST_DIR gets one row, decodable or not, except hidden files and files that are
not images: a suffix that is no image format's (README, labels.csv) and content that does not decode
as an image; those are skipped and listed in infer_report.json. With --list every listed name gets
its row.

What would make the CSV unwritable is found before any model work: an OUT_DIR this process cannot
write, test file names a `name, label` row cannot hold. The CSV is checked (one row per test image,
no duplicates, only known class ids) and written whole or not at all.
"""
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .backbone import resample_visual
from .data import IMAGE_SUFFIXES, ImageDataset, decodes, eval_transform
from .model import Classifier, load_model_file
from .outputs import OutputError, atomic_write, check_writable
from .report import peak_rss_gib, write_json
from .runtime import available_cpus, batched_pass, make_accelerator
from .scan import some_names, list_test_images, train_folder_likeness

log = logging.getLogger("app")
TEST_PRIOR_WARNING = (
    "--balance-test-prior fits a class bias on the test images' logits: the contest's rule 3 forbids "
    "using test images for tuning; organisers reportedly allowed it, but it is a rule risk (off by default)")


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


def not_image_files(root, names) -> list[str]:
    """The names whose suffix is no image format's and whose content does not decode as an image (a
    README or labels.csv left in TEST_DIR): not test images. A file with an image suffix is a test
    image whatever its content (an undecodable .jpg keeps its row)."""
    others = [n for n in names if Path(n).suffix.lower() not in IMAGE_SUFFIXES]
    with ThreadPoolExecutor(available_cpus()) as pool:           # Pillow decodes without the GIL
        images = list(pool.map(decodes, [Path(root) / n for n in others]))
    return [n for n, image in zip(others, images) if not image]


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


def tta_sizes(icfg: dict, meta: dict) -> list[int]:
    """The input sizes (px) the test images are seen at: the model's trained size, or with
    `tta: multiscale` each of `tta_scales` times it, rounded to the nearest whole number of patches
    (halves up, at least one patch); sizes that coincide are seen once."""
    trained, patch = meta["visual_config"]["image_size"], meta["visual_config"]["patch_size"]
    if icfg["tta"] != "multiscale":
        return [trained]
    return sorted({max(1, int(s * trained / patch + 0.5)) * patch for s in icfg["tta_scales"]})


def at_size(model: Classifier, meta: dict, size: int) -> Classifier:
    """The model for `size`-px input: its tower with position embeddings resampled to that grid
    (app.backbone.resample_visual), the same head and prior; the model itself at its trained size."""
    visual, _ = resample_visual(model.visual, meta["visual_config"], size)
    if visual is model.visual:
        return model
    scaled = Classifier(visual, len(meta["classes"]), model.log_prior)
    scaled.head = model.head
    return scaled.eval()


def predict_logits(model: Classifier, meta: dict, paths, cfg: dict, accelerator,
                   what: str = "test images") -> tuple[np.ndarray, np.ndarray, list]:
    """(balanced logits per image, decoded-ok mask, the sizes seen). One pass over the images per
    size, each with the eval transform at that size; with `tta` flip or multiscale, each size's
    logits are the mean of the image's and its mirror's, and the result is the mean over sizes: the
    plain average of the logits of every view, then argmax. `what`: the images, for the progress bar."""
    icfg = cfg["infer"]
    tau, flip = icfg["tau"], icfg["tta"] != "none"
    sizes = tta_sizes(icfg, meta)
    total, ok = 0.0, None
    for size in sizes:
        scaled = at_size(model, meta, size)

        def predict(x, scaled=scaled):
            logits = scaled.balanced_logits(x, tau)
            if flip:
                logits = 0.5 * (logits + scaled.balanced_logits(torch.flip(x, dims=[3]), tau))
            return logits

        dataset = ImageDataset(paths, eval_transform({**meta["preprocess"], "image_size": size}), size)
        logits, ok = batched_pass(predict, dataset, accelerator, icfg["batch_size"], cfg["num_workers"],
                                  f"infer: {what} at {size} px" + (" + mirror" if flip else ""))
        total = total + logits
    return total / len(sizes), ok, sizes


def fit_uniform_prior_bias(logits: np.ndarray, max_iterations: int = 1000,
                           tol: float = 1e-5) -> tuple[np.ndarray, int]:
    """(class bias b, iterations): the mean soft prediction over the images, mean_i softmax(logits_i + b),
    is uniform (1/C each within a relative tol), so argmax(logits + b) spreads the predictions evenly
    over the classes. Sinkhorn's column step in log space, b_c <- b_c - log(C * mean_i p_ic), repeated:
    deterministic. b is centred (a shift common to every class changes nothing)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    num_classes = z.shape[1]
    bias = torch.zeros(num_classes, dtype=torch.float64)
    for iteration in range(1, max_iterations + 1):
        step = torch.log(torch.softmax(z + bias, dim=1).mean(0) * num_classes)
        bias -= step
        if step.abs().max() < tol:
            break
    return (bias - bias.mean()).numpy(), iteration


def infer(test_dir, out_dir, cfg: dict, model_path=None, list_file=None) -> dict:
    t0 = time.perf_counter()
    # everything that would stop the run at its end is checked first, before any model work
    out_dir = check_writable(out_dir)
    model_path = Path(model_path) if model_path else out_dir / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {model_path} (run run_train.sh first, or pass --model)")
    files = list_test_images(test_dir, list_file)
    looks_like_train = None if list_file else train_folder_likeness(files.names)
    if looks_like_train:
        log.warning("TEST_DIR %s looks like a training folder: %s. Pass the folder that holds the test images "
                    "themselves (is this the train folder?)", test_dir, looks_like_train)
    skipped = [] if list_file else not_image_files(test_dir, files.names)
    names = sorted(set(files.names) - set(skipped))
    if skipped:
        log.warning("%d file(s) in %s are not images (no image suffix, content not an image): no row, "
                    "listed in infer_report.json: %s", len(skipped), test_dir, some_names(skipped))
    if not names:
        raise ValueError(f"no test images found in {list_file or test_dir}"
                         + (f" ({len(files.hidden)} hidden files skipped)" if files.hidden else "")
                         + (f" ({len(skipped)} files that are not images skipped)" if skipped else ""))
    check_csv_names(names)
    icfg = cfg["infer"]

    accelerator = make_accelerator(cfg)
    if icfg["balance_test_prior"] and accelerator.is_main_process:
        log.warning(TEST_PRIOR_WARNING)
    model, meta = load_model_file(model_path)
    model = model.to(accelerator.device)
    classes = meta["classes"]
    logits, ok, sizes = predict_logits(model, meta, [Path(test_dir) / n for n in names], cfg, accelerator)
    report = None
    if accelerator.is_main_process:
        test_prior_bias = None
        if icfg["balance_test_prior"]:
            fitted_on = logits[ok] if ok.any() else logits      # blank inputs of unreadable files left out
            bias, iterations = fit_uniform_prior_bias(fitted_on)
            logits = logits + bias
            test_prior_bias = {"max_minus_min": round(float(bias.max() - bias.min()), 4),
                               "std": round(float(bias.std()), 4), "iterations": iterations,
                               "fitted_on_images": len(fitted_on)}
            log.info("test-prior bias fitted on the test logits in %d iterations: spread (max - min) %.3f",
                     iterations, test_prior_bias["max_minus_min"])
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
                  "not_images_skipped": skipped,
                  "list_duplicates": files.duplicates,
                  "tau": icfg["tau"], "trained_image_size": meta["visual_config"]["image_size"],
                  "tta": icfg["tta"], "tta_sizes": sizes,
                  "tta_views": len(sizes) * (1 if icfg["tta"] == "none" else 2),
                  "balance_test_prior": bool(icfg["balance_test_prior"]), "test_prior_bias": test_prior_bias,
                  "predicted_class_counts": table["label"].value_counts().describe().round(2).to_dict(),
                  "seconds": round(time.perf_counter() - t0, 2), "peak_rss_gib": peak_rss_gib(),
                  "images_per_second": round(len(names) / max(1e-9, time.perf_counter() - t0), 1)}
        write_json(out_dir / "infer_report.json", report)
        log.info("submission.csv: %d rows -> %s", len(table), out_dir / "submission.csv")
    return report
