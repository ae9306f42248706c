"""The training program, top to bottom like the method section of the report:

scan -> backbone -> frozen features -> noise -> [validation split held out] -> head warmup
     -> LoRA fine-tune -> one model file -> its estimated test top-1.

Launched by run_train.sh through `accelerate launch`; stages that need one process run on the
main process and hand their results to the others through OUT_DIR/work/. What a resumed run
(--resume) checks and keeps: app/resume.py.
"""
import json
import logging
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import code_version, validation
from .backbone import check_settings, load_backbone
from .features import extract_features
from .finetune import finetune
from .lora import merge_lora
from .model import Classifier, load_model_file, log_class_prior, save_model_file
from .outputs import check_writable, set_aside_earlier_outputs
from .report import peak_rss_gib, plot_train_curves, write_json
from .resume import (Timer, check_resumable, continues_checkpoint, data_fingerprint, read_record,
                     unchanged_since_scan, write_record)
from .runtime import all_cores, make_accelerator, on_main_process, process_group_timeout_s
from .scan import list_train_files, scan_train_dir
from .sweep.shared import SharedStages, listing_digest
from .warmup import train_head

log = logging.getLogger("app")
MODEL_FILE = "model.pt"
SCAN_FILES = ("scan.csv", "skipped_before_decode.csv", "classes.json", "files.csv")


def prepare(train_dir, out_dir, cfg, accelerator, timer, resume=False, shared=None):
    """Scan, backbone, features and noise: everything `audit` runs too. With `resume`, the scan and
    noise stage of OUT_DIR/work are reused when the train folder is unchanged. `shared` (main process,
    config shared_dir): the SharedStages store the scan, the features and the noise stage are taken
    from when stored with the same key, and stored in when computed; without it all are computed.
    Returns (classes, images with weights, features, backbone, skipped files)."""
    out_dir, work = Path(out_dir), Path(out_dir) / "work"
    main = accelerator.is_main_process
    shared = shared or SharedStages()
    def scan():
        work.mkdir(parents=True, exist_ok=True)
        listing = list_train_files(train_dir)
        kept = resume and unchanged_since_scan(work, listing)
        if kept:
            log.info("resume: the train folder is unchanged (%d files): reusing the scan and the noise "
                     "stage of %s", len(listing[1]), work)
        else:
            (work / "noise.csv").unlink(missing_ok=True)          # belongs to the previous scan
        shared.reuse_or_run("scan", cfg, {name: work / name for name in SCAN_FILES},
                            lambda: write_scan(train_dir, listing, work), kept=kept,
                            listing=listing_digest(listing))

    with timer("backbone"):                   # first: the settings it decides are checked before any work
        backbone = load_backbone(cfg["backbone"])
        check_settings(backbone.config, cfg)
        if main:
            log.info("backbone: %s from %s (sha256 %s)", backbone.arch, backbone.source, backbone.sha256)
    with timer("scan"):
        on_main_process(accelerator, scan)
        classes = json.loads((work / "classes.json").read_text())
        images = pd.read_csv(work / "scan.csv", dtype={"path": str, "hash": str})
        skipped = pd.read_csv(work / "skipped_before_decode.csv", dtype=str)
    cache_dir = cfg["features"]["cache_dir"] or (Path(cfg["shared_dir"]) / "features" if cfg["shared_dir"]
                                                 else out_dir / "cache")
    with timer("features"):                   # the cache holds them: the store records who filled it
        feats, ok = shared.reuse_or_run(
            "features", cfg, {}, lambda: extract_features(backbone.resampled(cfg["features"]["image_size"]),
                                                          train_dir, images, cfg, accelerator, cache_dir),
            backbone_sha256=backbone.sha256, cache_dir=str(cache_dir))
    undecodable = images.loc[~ok, ["path"]].assign(reason="cannot be decoded as an image")
    skipped = pd.concat([skipped, undecodable], ignore_index=True)
    images, feats = images.loc[ok].reset_index(drop=True), feats[ok]
    if main and len(skipped):
        log.warning("skipped %d unreadable train files (listed in train_report.json)", len(skipped))
    noise_files = {"noise.csv": work / "noise.csv", "noise_scores.csv": out_dir / "noise_scores.csv",
                   "noise_report.png": out_dir / "noise_report.png"}
    def noise():
        with all_cores():
            scores = noise_stage(feats, images, classes, cfg, work, train_dir)
        write_noise_scores(out_dir, images, scores, classes)
        scores.to_csv(work / "noise.csv", index=False)

    with timer("noise"):                      # a noise.csv left by scan() is this very folder's (--resume)
        on_main_process(accelerator, lambda: shared.reuse_or_run(
            "noise", cfg, noise_files, noise, kept=resume and (work / "noise.csv").exists()))
        scores = pd.read_csv(work / "noise.csv")
    # probe_label: -1 in a noise.csv of an earlier version (a resumed run): no control variate then
    probe = scores["probe_label"].to_numpy(int) if "probe_label" in scores else -np.ones(len(scores), dtype=int)
    images = images.assign(clean_score=scores["clean_score"].to_numpy(float),
                           weight=scores["weight"].to_numpy(float), flag=scores["flag"].values, probe_label=probe)
    return classes, images, feats, backbone, skipped


def train(train_dir, out_dir, cfg, resume=False) -> dict:
    out_dir = check_writable(out_dir)           # every process, before any work: not after an hour
    if cfg["features"]["cache_dir"]:
        check_writable(cfg["features"]["cache_dir"])
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    if resume:
        check_resumable(out_dir, cfg)
    continuing = continues_checkpoint(out_dir, resume)
    timer = Timer(out_dir / "work" / "stage_seconds.json" if main else None, resumed=resume)
    shared = SharedStages(cfg["shared_dir"] if main else None)
    classes, images, feats, backbone, skipped = prepare(train_dir, out_dir, cfg, accelerator, timer, resume, shared)
    if main and not continuing:               # a model trained afresh: what an earlier model left is moved aside
        set_aside_earlier_outputs(out_dir)

    # the validation split, held out of everything below (warmup, prior, fine-tuning)
    split, trained, feats = hold_out_validation(images, feats, len(classes), cfg, main)
    labels, weights = trained["label"].to_numpy(), trained["weight"].to_numpy(float)
    counts = torch.from_numpy(np.bincount(labels, weights=weights, minlength=len(classes)))
    # class prior after noise handling; zeros = no prior correction (plain CE, raw argmax)
    log_prior = log_class_prior(counts) if cfg["prior_correction"] else torch.zeros(len(classes))
    # fine-tuning and inference at input.image_size: position embeddings resampled to its grid. With no
    # fine-tuning (a linear probe) the model is the frozen tower at the size its head was fitted on
    tuned = cfg["finetune"]["tune"] != "none"
    backbone = backbone.resampled(cfg["input"]["image_size"] if tuned else cfg["features"]["image_size"])
    model = Classifier(backbone.visual, len(classes), log_prior)

    with timer("warmup"):
        warm_history = warm_start(model, feats, labels, weights, log_prior, cfg, accelerator, out_dir / "work",
                                  continuing, shared)

    run_meta = {"visual_config": backbone.config, "preprocess": backbone.preprocess, "classes": classes}

    def evaluate(classifier, meta=run_meta, with_predictions=False):
        """The estimate and its contrast for a Classifier (this run's, or a model file's with its `meta`)."""
        return validation.evaluate(classifier, meta, train_dir, images, split, cfg, accelerator, with_predictions)

    with timer("finetune"):
        keep = weights > 0
        history = finetune(model, train_dir, trained["path"].values[keep], labels[keep], weights[keep],
                           backbone.preprocess, cfg, accelerator, out_dir, resume=resume,
                           data=data_fingerprint(trained.loc[keep]),
                           evaluate=evaluate if split else None) if tuned else []

    def export():
        exported = accelerator.unwrap_model(model).cpu().float()
        merge_lora(exported.visual)
        save_model_file(out_dir / MODEL_FILE, exported, backbone, classes, cfg, code_version())

    with timer("export"):
        on_main_process(accelerator, export)
    estimate = None
    if split:
        with timer("validation"):             # the model file itself, inferred as run_infer.sh does
            exported, meta = load_model_file(out_dir / MODEL_FILE)
            estimate = evaluate(exported.to(accelerator.device), meta, with_predictions=True)
        predicted = estimate.pop("predicted")
        if main:
            validation.split_table(images, split, classes, predicted).to_csv(out_dir / "validation_split.csv",
                                                                              index=False)

    report = None
    if main:
        report = train_report(cfg, accelerator, train_dir, backbone, classes, images, skipped, trained, split,
                              estimate, warm_history, history, timer, shared, resume)
        write_json(out_dir / "train_report.json", report)
        plot_train_curves(warm_history, history, out_dir / "train_curves.png", estimate)
        log.info("model written to %s (%.0f s)", out_dir / MODEL_FILE, report["total_seconds"])
        if estimate:
            log_estimate(report)
    accelerator.wait_for_everyone()
    return report


def audit(train_dir, out_dir, cfg) -> None:
    """Scan, features and noise stage alone: inspect a dataset's noise before training."""
    out_dir = check_writable(out_dir)
    accelerator = make_accelerator(cfg)
    timer = Timer()
    _, images, _, _, skipped = prepare(train_dir, out_dir, cfg, accelerator, timer)
    if accelerator.is_main_process:
        log.info("audit: %d images scored, %d skipped, flags %s -> %s", len(images), len(skipped),
                 images["flag"].value_counts().to_dict(), Path(out_dir) / "noise_scores.csv")


def write_scan(train_dir, listing, work: Path) -> None:
    """The scan of the listed train files (list_train_files) into OUT_DIR/work: the images with their
    labels and content hashes, the files skipped before decoding, the classes and the listing itself."""
    classes, images, skipped = scan_train_dir(train_dir, listing)
    images.to_csv(work / "scan.csv", index=False)
    skipped.to_csv(work / "skipped_before_decode.csv", index=False)
    (work / "classes.json").write_text(json.dumps(classes))
    listing[1].to_csv(work / "files.csv", index=False)


def noise_stage(feats, images, classes, cfg, work: Path, train_dir):
    """Per-image clean score, weight, flag and suggested label. The detector runs when training
    (noise.enabled) or the validation estimate needs it; else every image is clean, weight 1."""
    n = len(images)
    if not (cfg["noise"]["enabled"] or validation.enabled(cfg)):
        return pd.DataFrame({"clean_score": np.ones(n), "weight": np.ones(n), "flag": ["clean"] * n,
                             "suggested_label": -np.ones(n, dtype=int), "probe_label": -np.ones(n, dtype=int)})
    from .noise import detect_noise, plot_noise_report
    noise_cfg = {k: v for k, v in cfg["noise"].items() if k not in ("enabled", "max_drop_fraction")}
    scores = detect_noise(feats, images["label"].to_numpy().copy(), len(classes), list(images["hash"]),
                          noise_cfg, cfg["seed"])
    # Safety net: a detector that would throw away most of the data is not trusted that far
    # (tiny or degenerate datasets, a backbone that does not fit the domain). Keep the best-scoring.
    cap = int(cfg["noise"]["max_drop_fraction"] * n)
    dropped = np.flatnonzero(scores["weight"].to_numpy() <= 0)
    if len(dropped) > cap:
        order = dropped[np.argsort(-scores["clean_score"].to_numpy()[dropped], kind="stable")]
        restore = order[: len(dropped) - cap]
        scores.loc[restore, "weight"] = 1.0
        log.warning("noise: the detector would drop %d of %d images (> noise.max_drop_fraction=%.2f); "
                    "%d highest-scoring of them are kept with weight 1", len(dropped), n,
                    cfg["noise"]["max_drop_fraction"], len(restore))
    try:
        plot_noise_report(scores, [Path(train_dir) / p for p in images["path"]], classes,
                          work.parent / "noise_report.png")
    except Exception as e:  # noqa: BLE001 - a figure never stops training
        log.warning("noise_report.png not written: %s", e)
    return scores


def write_noise_scores(out_dir: Path, images, scores, classes) -> pd.DataFrame:
    table = pd.DataFrame({
        "path": images["path"].values,
        "given_label": [classes[i] for i in images["label"]],
        "clean_score": np.round(scores["clean_score"].to_numpy(float), 4),
        "weight": np.round(scores["weight"].to_numpy(float), 4),
        "flag": scores["flag"].values,
        "suggested_label": [classes[i] if i >= 0 else "" for i in scores["suggested_label"]],
        "probe_label": [classes[i] if i >= 0 else "" for i in scores["probe_label"]],
    })
    table.to_csv(out_dir / "noise_scores.csv", index=False)
    return table


def hold_out_validation(images: pd.DataFrame, feats, num_classes: int, cfg: dict, main: bool):
    """(the validation split or None, the images left to train on, their features). Their sample
    weights are the noise stage's, or 1 with noise.enabled false: the detector's scores then only
    weigh the estimate."""
    split = validation.choose_split(images, num_classes, cfg)
    kept = ~split.held_out if split else np.ones(len(images), dtype=bool)
    trained = images.loc[kept].reset_index(drop=True)
    if not cfg["noise"]["enabled"]:
        trained = trained.assign(weight=1.0)
    if main and split:
        v = split.summary(images, num_classes)
        log.info("validation: split of %d images (%d of %d classes); %d images held out (%.1f%%)",
                 v["split_images"], v["classes_covered"], v["classes"], v["held_out_images"],
                 100 * v["held_out_share"])
    elif main and validation.enabled(cfg):
        log.warning("validation: too few images for a split within validation.max_fraction and "
                    "max_class_share: no estimated test top-1")
    return split, trained, feats[kept]


def warm_start(model, feats, labels, weights, log_prior, cfg, accelerator, work: Path, continuing: bool,
               shared: SharedStages) -> list:
    """Head warmup: the head fitted on the frozen features (sample weights, class prior) and copied
    into `model`; returns its loss per epoch. With shared_dir the main process fits it or takes it
    from the store (work/head.pt), and every process reads it from there. A run that continues a
    checkpoint (`continuing`) skips it: the checkpoint holds the trained head; the losses, for the
    report, are those the first run kept in work/warmup_history.json (main process; [] elsewhere)."""
    main = accelerator.is_main_process
    history_file = work / "warmup_history.json"
    if continuing:
        return read_record(history_file, []) if main else []

    def fit_head():
        return train_head(feats, labels, weights, log_prior, cfg["warmup"], cfg["seed"],
                          show_progress=main, device=accelerator.device)
    if cfg["shared_dir"]:
        head_file = work / "head.pt"
        def fit_and_save():
            w, b, losses = fit_head()
            torch.save({"weight": w, "bias": b, "losses": losses}, head_file)
        on_main_process(accelerator, lambda: shared.reuse_or_run("warmup", cfg, {"head.pt": head_file},
                                                                 fit_and_save, device=accelerator.device.type))
        head = torch.load(head_file, weights_only=True)
        w, b, history = head["weight"], head["bias"], head["losses"]
    else:
        w, b, history = fit_head()
    model.head.weight.data.copy_(w)
    model.head.bias.data.copy_(b)
    if main:                                  # for the report of a run resumed after the warmup
        write_record(history_file, history)
    return history


def train_report(cfg, accelerator, train_dir, backbone, classes, images, skipped, trained, split, estimate,
                 warm_history, history, timer, shared, resume) -> dict:
    """train_report.json: the data used and skipped, the estimate, the seconds of every stage, the
    losses, the machine and the settings."""
    weights = trained["weight"].to_numpy(float)
    return {
        "code_version": code_version(),
        "backbone": {"arch": backbone.arch, "source": backbone.source, "sha256": backbone.sha256},
        "train_dir": str(train_dir),
        "classes": len(classes),
        "input_image_size": backbone.config["image_size"],
        "images": {"files_found": int(len(images) + len(skipped)), "used": int(len(images)),
                   "skipped": int(len(skipped)),
                   "held_out": int(len(images) - len(trained)),
                   "trained_on": int((weights > 0).sum()),
                   "flags": images["flag"].value_counts().to_dict(),
                   "empty_classes": [c for c, n in zip(classes, np.bincount(images["label"],
                                                                            minlength=len(classes))) if n == 0]},
        **validation_report(estimate, split, images, len(classes), cfg),
        "skipped_files": skipped.to_dict("records"),
        "stage_seconds": timer.times,
        **({"shared_stages": shared.used} if shared.folder else {}),
        "total_seconds": timer.elapsed,
        "resumed": bool(resume),
        "peak_rss_gib": peak_rss_gib(),
        "warmup_losses": [round(x, 5) for x in warm_history],
        "finetune_epochs": history,
        "processes": accelerator.num_processes,
        "process_group_timeout_s": process_group_timeout_s(accelerator),
        "device": str(accelerator.device),
        "torch_threads": torch.get_num_threads(),
        "precision": accelerator.mixed_precision,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seed": cfg["seed"],
        "config": cfg,
    }


def validation_report(estimate: dict | None, split, images, num_classes: int, cfg) -> dict:
    """train_report.json's estimate: top-level figures + how they were made."""
    if estimate is None:          # validation.per_class 0, or too few images
        return {"estimated_test_top1": None, "validation": {"per_class": cfg["validation"]["per_class"],
                                                            "split_images": 0}}
    summary = split.summary(images, num_classes)
    too_uncertain = validation.too_uncertain(estimate["estimated_test_top1_interval95"], summary, cfg["validation"])
    return {**estimate, "estimate_too_uncertain": too_uncertain, "validation": {
        **summary,
        "estimate": "top-1 against the given labels, each image weighted by its clean score over (its class's mean "
                    "clean score x its class's count in the split), corrected by a control variate: the noise "
                    "stage's out-of-fold frozen probe agrees with the label on a known share of every class's "
                    "images, and the regression on it removes how much easier or harder the drawn images are "
                    "(estimate_without_control_variate: the weighted top-1 alone); inferred from model.pt as "
                    f"run_infer.sh does (one view, balanced prior tau={cfg['infer']['tau']})",
        "interval": "95% Wilson score interval at the Kish effective size of the weighted, class-balanced mean, "
                    "enlarged by the variance the control variate removes: the split's sampling error only",
        "noisy_split": "plain top-1 against the given labels on the same images, weighted to the classes' "
                       "training-set shares: a uniform random split's expected top-1",
        "bias_correction": None}}


def log_estimate(report: dict) -> None:
    """The log's last lines: the estimate, then the plain noisy-label figure for contrast."""
    v = report["validation"]
    log.info("estimated test top-1: %.1f%% (95%% interval %.1f-%.1f%%; %d held-out images in %d of %d classes, "
             "weighted by their clean scores)", 100 * report["estimated_test_top1"],
             *(100 * x for x in report["estimated_test_top1_interval95"]), v["split_images"],
             v["classes_covered"], v["classes"])
    log.info("noisy random split (what teams measured, for contrast): %.1f%% on the same images",
             100 * report["noisy_split_top1"])
    if report["estimate_too_uncertain"]:
        log.warning("estimated test top-1: %s", report["estimate_too_uncertain"])
