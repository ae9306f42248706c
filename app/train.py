"""The training program, top to bottom like the method section of the report:

scan -> backbone -> frozen features -> noise -> [validation split held out] -> head warmup
     -> LoRA fine-tune -> one model file -> its estimated test top-1.

Launched by run_train.sh through `accelerate launch`; stages that need one process run on the
main process and hand their results to the others through OUT_DIR/work/.
"""
import contextlib
import hashlib
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import code_version, validation
from .backbone import check_settings, load_backbone
from .config import differences, shaping
from .features import extract_features
from .finetune import finetune, latest_checkpoint
from .lora import merge_lora
from .model import Classifier, load_model_file, log_class_prior, save_model_file
from .outputs import check_writable, set_aside_earlier_outputs
from .report import peak_rss_gib, plot_train_curves, write_json
from .runtime import all_cores, make_accelerator, on_main_process, process_group_timeout_s
from .scan import list_train_files, scan_train_dir
from .sweep.shared import SharedStages, listing_digest
from .warmup import train_head

log = logging.getLogger("app")
MODEL_FILE = "model.pt"


class Timer:
    """Wall time per stage, for the report: `with timer("features"): ...`. With `record` (a file), the
    seconds are also written there as each stage ends, an interrupted stage's included; a resumed run
    (`resumed`) starts from that file's, so that its report counts the seconds of every run: a stage's
    seconds add up over the runs, and so does `elapsed`."""

    def __init__(self, record: Path | None = None, resumed: bool = False):
        self.record, self.t0 = record, time.perf_counter()
        earlier = json.loads(record.read_text()) if resumed and record and record.exists() else {}
        self.times, self.before = earlier.get("stages", {}), earlier.get("elapsed", 0.0)

    @property
    def elapsed(self) -> float:
        return round(self.before + time.perf_counter() - self.t0, 2)

    @contextlib.contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - t0, 2)
            if self.record:
                self.record.parent.mkdir(parents=True, exist_ok=True)
                self.record.write_text(json.dumps({"stages": self.times, "elapsed": self.elapsed}))


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


def unchanged_since_scan(work: Path, listing) -> bool:
    """--resume: whether OUT_DIR/work holds the scan of this very train folder (the same classes and
    files, sizes and modification times). False when there is no scan to reuse or no checkpoint to
    resume (the run then starts afresh); a ValueError naming the differences when a checkpoint
    exists but the folder changed: resuming would continue a model on other data."""
    if not (work / "files.csv").exists() or not latest_checkpoint(work.parent / "checkpoints"):
        return False
    classes, now = listing
    before = pd.read_csv(work / "files.csv", dtype={"path": str})
    old_classes = json.loads((work / "classes.json").read_text())
    merged = before.merge(now, on="path", how="outer", suffixes=("_old", ""), indicator=True)
    added = merged.loc[merged["_merge"] == "right_only", "path"].tolist()
    removed = merged.loc[merged["_merge"] == "left_only", "path"].tolist()
    both = merged[merged["_merge"] == "both"]
    changed = both.loc[(both["size"] != both["size_old"]) | (both["mtime_ns"] != both["mtime_ns_old"]), "path"]
    if classes == old_classes and not (added or removed or len(changed)):
        return True
    examples = (added + removed + changed.tolist())[:5]
    raise ValueError(
        f"--resume: the train folder changed since the interrupted run ({len(added)} files added, "
        f"{len(removed)} removed, {len(changed)} modified"
        f"{', classes differ' if classes != old_classes else ''}; e.g. {examples}). A resumed run must "
        f"continue on the same data: restore the folder, or start afresh without --resume (or in a new OUT_DIR).")


def check_resumable(out_dir: Path, cfg: dict) -> None:
    """--resume: a ValueError naming every setting that shapes the model or its data (config.shaping)
    and differs from the checkpoint's, before any work. Nothing to check without a checkpoint (the run
    starts from the beginning)."""
    latest = latest_checkpoint(out_dir / "checkpoints")
    state_file = latest / "trainer_state.json" if latest else None
    if not (state_file and state_file.exists()):
        return
    changed = differences(json.loads(state_file.read_text()).get("settings", {}), shaping(cfg))
    if changed:
        raise ValueError(f"--resume: the checkpoint {latest} was trained with other settings ({'; '.join(changed)}). "
                         f"Resume with its settings, or start afresh: the same command without --resume "
                         f"(the earlier run's outputs are moved aside), or another OUT_DIR.")


def data_fingerprint(images: pd.DataFrame) -> dict:
    """What a checkpoint was trained on: image count and a digest of (path, label, content hash, weight)."""
    rows = pd.util.hash_pandas_object(images[["path", "label", "hash", "weight"]], index=False)
    return {"images": int(len(images)), "digest": hashlib.sha1(rows.to_numpy().tobytes()).hexdigest()}


SCAN_FILES = ("scan.csv", "skipped_before_decode.csv", "classes.json", "files.csv")


def prepare(train_dir, out_dir, cfg, accelerator, timer, resume=False, shared=None):
    """Scan, backbone, features and noise: everything `audit` runs too. With `resume`, the scan and
    noise stage of OUT_DIR/work are reused when the train folder is unchanged. `shared` (main process,
    config shared_dir): a SharedStages store the scan, the features and the noise stage are taken from
    when stored with the same key, and stored in when computed.
    Returns (classes, images with weights, features, backbone, skipped files)."""
    out_dir, work = Path(out_dir), Path(out_dir) / "work"
    main = accelerator.is_main_process
    def scan():
        work.mkdir(parents=True, exist_ok=True)
        listing = list_train_files(train_dir)
        if shared:
            shared.key("scan", cfg, listing=listing_digest(listing))
        if resume and unchanged_since_scan(work, listing):
            log.info("resume: the train folder is unchanged (%d files): reusing the scan and the noise "
                     "stage of %s", len(listing[1]), work)
            return
        (work / "noise.csv").unlink(missing_ok=True)          # belongs to the previous scan
        if shared and shared.fetch("scan", {name: work / name for name in SCAN_FILES}):
            log.info("shared: the scan of %s reused from %s", train_dir, shared.folder)
            return
        t0 = time.perf_counter()
        classes, images, skipped = scan_train_dir(train_dir, listing)
        images.to_csv(work / "scan.csv", index=False)
        skipped.to_csv(work / "skipped_before_decode.csv", index=False)
        (work / "classes.json").write_text(json.dumps(classes))
        listing[1].to_csv(work / "files.csv", index=False)
        if shared:
            shared.publish("scan", {name: work / name for name in SCAN_FILES}, time.perf_counter() - t0)

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
    features_stored = False
    if shared:
        shared.key("features", cfg, backbone_sha256=backbone.sha256, cache_dir=str(cache_dir))
        features_stored = shared.fetch("features", {})
    with timer("features"):
        feats, ok = extract_features(backbone.resampled(cfg["features"]["image_size"]), train_dir, images, cfg,
                                     accelerator, cache_dir)
    if shared and not features_stored:           # the cache holds them: a record of who filled it
        shared.publish("features", {}, timer.times["features"])
    undecodable = images.loc[~ok, ["path"]].assign(reason="cannot be decoded as an image")
    skipped = pd.concat([skipped, undecodable], ignore_index=True)
    images, feats = images.loc[ok].reset_index(drop=True), feats[ok]
    if main and len(skipped):
        log.warning("skipped %d unreadable train files (listed in train_report.json)", len(skipped))
    noise_files = {"noise.csv": work / "noise.csv", "noise_scores.csv": out_dir / "noise_scores.csv",
                   "noise_report.png": out_dir / "noise_report.png"}
    def noise():
        if shared:
            shared.key("noise", cfg)
        if resume and (work / "noise.csv").exists():          # kept by scan() for this very folder
            return
        if shared and shared.fetch("noise", noise_files):
            log.info("shared: the noise stage reused from %s", shared.folder)
            return
        t0 = time.perf_counter()
        with all_cores():
            scores = noise_stage(feats, images, classes, cfg, work, train_dir)
        write_noise_scores(out_dir, images, scores, classes)
        scores.to_csv(work / "noise.csv", index=False)
        if shared:
            shared.publish("noise", noise_files, time.perf_counter() - t0)

    with timer("noise"):
        on_main_process(accelerator, noise)
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
    timer = Timer(out_dir / "work" / "stage_seconds.json" if main else None, resumed=resume)
    shared = SharedStages(cfg["shared_dir"]) if cfg["shared_dir"] and main else None
    classes, images, feats, backbone, skipped = prepare(train_dir, out_dir, cfg, accelerator, timer, resume, shared)
    if main and not resume:                   # data to train on: what an earlier model left is moved aside
        set_aside_earlier_outputs(out_dir)

    # the validation split, held out of everything below (warmup, prior, fine-tuning)
    split, trained, feats = hold_out_validation(images, feats, len(classes), cfg, main)
    labels, weights = trained["label"].to_numpy(), trained["weight"].to_numpy(float)
    counts = torch.from_numpy(np.bincount(labels, weights=weights, minlength=len(classes)))
    # class prior after noise handling; zeros = no prior correction (plain CE, raw argmax)
    log_prior = log_class_prior(counts) if cfg["prior_correction"] else torch.zeros(len(classes))
    # fine-tuning and inference at input.image_size: position embeddings resampled to its grid. With no
    # fine-tuning (a linear probe) the model is the frozen tower at the size its head was fitted on
    backbone = backbone.resampled(cfg["input"]["image_size"] if cfg["finetune"]["epochs"]
                                  else cfg["features"]["image_size"])
    model = Classifier(backbone.visual, len(classes), log_prior)

    with timer("warmup"):
        if resume and latest_checkpoint(out_dir / "checkpoints"):
            warm_file = out_dir / "work" / "warmup_history.json"   # the checkpoint holds the trained head
            warm_history = json.loads(warm_file.read_text()) if warm_file.exists() else []
        else:
            def fit_head():
                return train_head(feats, labels, weights, log_prior, cfg["warmup"], cfg["seed"],
                                  show_progress=main, device=accelerator.device)
            if cfg["shared_dir"]:                      # fitted once (main process), stored, read by all
                head_file = out_dir / "work" / "head.pt"
                def warmup():
                    shared.key("warmup", cfg, device=accelerator.device.type)
                    if shared.fetch("warmup", {"head.pt": head_file}):
                        log.info("shared: the head warmup reused from %s", shared.folder)
                        return
                    t1 = time.perf_counter()
                    w, b, losses = fit_head()
                    torch.save({"weight": w, "bias": b, "losses": losses}, head_file)
                    shared.publish("warmup", {"head.pt": head_file}, time.perf_counter() - t1)
                on_main_process(accelerator, warmup)
                head = torch.load(head_file, weights_only=True)
                w, b, warm_history = head["weight"], head["bias"], head["losses"]
            else:
                w, b, warm_history = fit_head()
            model.head.weight.data.copy_(w)
            model.head.bias.data.copy_(b)
    if main:                                  # for the report of a run resumed after the warmup
        (out_dir / "work" / "warmup_history.json").write_text(json.dumps(warm_history))

    run_meta = {"visual_config": backbone.config, "preprocess": backbone.preprocess, "classes": classes}

    def evaluate(classifier, meta=run_meta, with_predictions=False):
        """The estimate and its contrast for a Classifier (this run's, or a model file's with its `meta`)."""
        return validation.evaluate(classifier, meta, train_dir, images, split, cfg, accelerator, with_predictions)

    with timer("finetune"):
        keep = weights > 0
        history = finetune(model, train_dir, trained["path"].values[keep], labels[keep], weights[keep],
                           backbone.preprocess, cfg, accelerator, out_dir, resume=resume,
                           data=data_fingerprint(trained.loc[keep]), evaluate=evaluate if split else None)

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
        report = {
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
            **({"shared_stages": shared.used} if shared else {}),
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
        write_json(out_dir / "train_report.json", report)
        plot_train_curves(warm_history, history, out_dir / "train_curves.png", estimate)
        log.info("model written to %s (%.0f s)", out_dir / MODEL_FILE, report["total_seconds"])
        if estimate:
            log_estimate(report)
    accelerator.wait_for_everyone()
    return report


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


def audit(train_dir, out_dir, cfg) -> None:
    """Scan, features and noise stage alone: inspect a dataset's noise before training."""
    out_dir = check_writable(out_dir)
    accelerator = make_accelerator(cfg)
    timer = Timer()
    _, images, _, _, skipped = prepare(train_dir, out_dir, cfg, accelerator, timer)
    if accelerator.is_main_process:
        log.info("audit: %d images scored, %d skipped, flags %s -> %s", len(images), len(skipped),
                 images["flag"].value_counts().to_dict(), Path(out_dir) / "noise_scores.csv")
