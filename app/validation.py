"""Trusted validation: an estimate of the clean, class-balanced test top-1 from the noisy training set.

The test set is clean and class-balanced; a random held-out split of the noisy training labels is
neither, and it misleads (field notes: a team read ~70% locally, ~60% on the platform, and ranked
its runs in the wrong order). The noise stage knows which images are probably clean: the estimate
is built on it.

- **Trusted split** (`trusted_split`): a few images per class (`validation.per_class`), drawn
  uniformly among the images the noise stage keeps (weight > 0: flagged images and dropped
  duplicate copies are out). Not the images with the top clean scores: there the frozen features
  already agree with the label. Measured with frozen linear probes on flowers102-noisy
  (bench/trusted_split_study.py: the truth file's clean images as reference, 30 draws x 3 probes
  of 22-38% top-1): the top-3 clean scores read +16 to +27 points too high, this draw -0.1 to
  +2.4 (mean absolute error 2.5 points; the better the probe, the higher), a draw in proportion
  to the clean posterior +0.7 to +3.0 (3.0), a random split of the noisy labels -1.5 to -10.9
  (7.3). What remains is the hard clean images the noise stage flags (never drawn), partly
  offset by the noisy images it keeps (counted wrong). A class gives at most `max_class_share` of
  its clean-held images; `per_class` shrinks for every class until both splits together are at
  most `max_fraction` of the images (on the proxy, holding out 9.2% cost 3.1 points: TECH_REPORT 4c).
- **Noisy random split** (`noisy_random_split`): as many images, drawn uniformly from all the
  others with their given labels: what teams did. Shown for contrast only.
- Both are **held out**: not in the head warmup, not in fine-tuning, not in the class prior (the
  contrast has to be held out to mean what the teams' number meant). An image's byte-identical
  copies are held out with it: they would hand the model the answer.
- **Evaluated as the submission is** (`evaluate`: app/infer.predict_logits at the trained size,
  balanced logits with `infer.tau`, one view per image): after every fine-tuning epoch, on the
  weights that would be exported (the average, when averaging is on), and on the exported model file.

`estimated_test_top1` = the mean over the covered classes of the per-class top-1 on the trusted
split (class-balanced, like the test). Its 95% interval is Wilson's score interval at the split's
Kish effective size, K^2 / sum_c(1/n_c) for K classes of n_c images (= the image count when every
class gives the same number): the sampling error of the split, not the noise stage's
miscalibration nor any difference between the train and test photos. Classes that give no image
(fewer clean-held images than 1 / max_class_share) are left out of the mean; the report counts
them. No bias correction is applied.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .infer import predict_logits

Z95 = 1.959964            # two-sided 95% normal quantile
# independent random streams of the two draws for one seed (arbitrary constants, fixed forever)
TRUSTED_STREAM, NOISY_STREAM = 0x7E57, 0x0A15E


def enabled(cfg: dict) -> bool:
    return bool(cfg["validation"]["per_class"])


def per_class_counts(images: pd.DataFrame, num_classes: int, vcfg: dict) -> np.ndarray:
    """Images each class gives to the trusted split: per_class, at most max_class_share of its
    clean-held images (weight > 0), per_class lowered for every class until the two held-out splits
    (the trusted one and the noisy contrast of the same size) together are at most max_fraction of
    the images."""
    clean_held = np.bincount(images["label"].to_numpy()[images["weight"].to_numpy() > 0], minlength=num_classes)
    cap = np.floor(vcfg["max_class_share"] * clean_held).astype(int)
    budget = vcfg["max_fraction"] * len(images)
    for k in range(int(vcfg["per_class"]), 0, -1):
        counts = np.minimum(k, cap)
        if 2 * counts.sum() <= budget:             # the noisy contrast split is as large again
            return counts
    return np.zeros(num_classes, dtype=int)


def trusted_split(images: pd.DataFrame, num_classes: int, vcfg: dict, seed: int) -> np.ndarray:
    """Row indices of the trusted split (sorted): per class, a uniform draw among its clean-held
    images. `images`: label and weight (the noise stage's) per row. Deterministic for a seed."""
    rng = np.random.default_rng([seed, TRUSTED_STREAM])
    labels, clean_held = images["label"].to_numpy(), images["weight"].to_numpy() > 0
    chosen = [rng.choice(np.flatnonzero((labels == c) & clean_held), size=k, replace=False)
              for c, k in enumerate(per_class_counts(images, num_classes, vcfg)) if k]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=int)


def noisy_random_split(exclude: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Row indices (sorted) of `size` images drawn uniformly from the rows that the bool mask
    `exclude` leaves, whatever their class or clean score: a random split of the noisy labels."""
    rng = np.random.default_rng([seed, NOISY_STREAM])
    pool = np.flatnonzero(~exclude)
    return np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))


@dataclass(frozen=True)
class ValidationSplits:
    trusted: np.ndarray        # row indices of `images`, evaluated with their given labels
    noisy_random: np.ndarray
    held_out: np.ndarray       # bool per row: the two splits and every byte-identical copy of them

    def summary(self, images: pd.DataFrame, num_classes: int) -> dict:
        trusted = images.iloc[self.trusted]
        per_class = np.bincount(trusted["label"], minlength=num_classes)
        return {"trusted_images": len(self.trusted), "classes_covered": int((per_class > 0).sum()),
                "classes": num_classes, "per_class_max": int(per_class.max(initial=0)),
                "trusted_mean_clean_score": round(float(trusted["clean_score"].mean()), 4) if len(trusted) else None,
                "noisy_random_images": len(self.noisy_random),
                "held_out_images": int(self.held_out.sum()),
                "held_out_share": round(float(self.held_out.mean()), 4) if len(images) else 0.0,
                "held_out_clean_held": int((self.held_out & (images["weight"].to_numpy() > 0)).sum())}


def choose_splits(images: pd.DataFrame, num_classes: int, cfg: dict) -> ValidationSplits | None:
    """The trusted and noisy random splits of this run (None when `validation.per_class` is 0, or
    when the data are too few for even one image per class within the caps)."""
    if not enabled(cfg):
        return None
    trusted = trusted_split(images, num_classes, cfg["validation"], cfg["seed"])
    if not len(trusted):
        return None
    hashes = images["hash"].to_numpy()
    noisy = noisy_random_split(np.isin(hashes, hashes[trusted]), len(trusted), cfg["seed"])
    return ValidationSplits(trusted, noisy, np.isin(hashes, hashes[np.concatenate([trusted, noisy])]))


def wilson_interval(p: float, n: float, z: float = Z95) -> list[float]:
    """Wilson's score interval of a proportion p observed on n (effective) trials."""
    if n <= 0:
        return [0.0, 1.0]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def trusted_estimate(correct: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """(mean per-class top-1, its 95% Wilson interval at the Kish effective size) over the classes
    present in `labels`."""
    classes, counts = np.unique(labels, return_counts=True)
    if not len(classes):
        return float("nan"), [0.0, 1.0]
    per_class = np.array([correct[labels == c].mean() for c in classes])
    estimate = float(per_class.mean())
    effective_n = len(classes) ** 2 / float(np.sum(1.0 / counts))
    return estimate, wilson_interval(estimate, effective_n)


def evaluate(model, meta: dict, root, images: pd.DataFrame, splits: ValidationSplits, cfg: dict,
             accelerator, with_predictions: bool = False) -> dict:
    """Top-1 of `model` (a Classifier) on both splits, inferred as run_infer.sh does by default: the
    eval transform at the trained size, balanced logits with infer.tau, one view per image. Every
    process calls it (the images are shared out and the logits gathered). `meta`: visual_config and
    preprocess of the model (what its model file holds). With `with_predictions`, also the predicted
    class index of every evaluated image (trusted rows first, then the noisy ones)."""
    rows = np.concatenate([splits.trusted, splits.noisy_random])
    infer_cfg = {**cfg, "infer": {**cfg["infer"], "tta": "none"}}
    was_training = model.training
    model.eval()
    logits, _, _ = predict_logits(model, meta, [Path(root) / p for p in images["path"].to_numpy()[rows]],
                                  infer_cfg, accelerator)
    model.train(was_training)
    predicted = logits.argmax(1)
    correct = predicted == images["label"].to_numpy()[rows]
    n = len(splits.trusted)
    estimate, interval = trusted_estimate(correct[:n], images["label"].to_numpy()[splits.trusted])
    noisy = float(correct[n:].mean()) if len(splits.noisy_random) else float("nan")
    result = {"estimated_test_top1": round(estimate, 4),
              "estimated_test_top1_interval95": [round(x, 4) for x in interval], "noisy_split_top1": round(noisy, 4)}
    if with_predictions:
        result["predicted"] = predicted
    return result


def split_table(images: pd.DataFrame, splits: ValidationSplits, classes, predicted: np.ndarray) -> pd.DataFrame:
    """validation_split.csv: one row per evaluated image, its split, clean score and the exported
    model's prediction."""
    rows = np.concatenate([splits.trusted, splits.noisy_random])
    part = images.iloc[rows]
    return pd.DataFrame({
        "path": part["path"].to_numpy(),
        "split": ["trusted"] * len(splits.trusted) + ["noisy_random"] * len(splits.noisy_random),
        "given_label": [classes[i] for i in part["label"]],
        "clean_score": np.round(part["clean_score"].to_numpy(float), 4),
        "predicted": [classes[i] for i in predicted],
    })
