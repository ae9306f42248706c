"""Validation: an estimate of the clean, class-balanced test top-1 from the noisy training set.

The test set is clean and class-balanced; a random held-out split of the noisy training labels is
neither, and it misleads (field notes: a team read ~70% locally, ~60% on the platform, and ranked
its runs in the wrong order). The noise stage knows which images are probably clean: the estimate
weighs the held-out images by it.

- **One validation split** (`validation_split`): a few images per class (`validation.per_class`),
  drawn uniformly within each class whatever the noise stage thinks of them, so hard clean images,
  noisy images and off-topic ones come in at their rate. A class gives at most `max_class_share` of
  its images; `per_class` shrinks for every class until the split is at most `max_fraction` of the
  images, and where even one image a class does not fit, one image from each of a uniform draw of
  classes stands for all of them. Held out of the head warmup, fine-tuning and the class prior, with every byte-identical
  copy of its images (a copy would hand the model the answer).
- **Estimate** (`estimate_top1`): the split's top-1 against the given labels, each image weighted by
  its clean score (the noise stage's probability that its given label is right) over its class's
  mean clean score and its class's count in the split: u = score / (k_c x mean score of class c),
  estimate = sum(u x right) / sum(u). Every class weighs 1 in expectation (the test is
  class-balanced, however noisy a class's labels), a wrong label counts for little, a sure one fully,
  hard clean images are in. **Control variate** (`ProbeCovariate`): a few images a class are a
  lucky or unlucky draw, easier or harder than their classes. The noise stage's out-of-fold frozen
  probe says, for EVERY training image, whether it agrees with the given label, so its weighted
  agreement is known for the whole class as well as measured on the split; the regression estimator
  m - beta (x - mu) removes the part of the draw's luck that the probe sees (unbiased to O(1/n),
  fitted on nothing but the split; on a split no luckier than its classes it changes nothing). Its
  95% interval is Wilson's score interval at the Kish effective size sum(u)^2 / sum(u^2), enlarged by
  the variance the control variate removes: the split's sampling error only, not the noise stage's
  miscalibration nor any difference between the train and test photos. No bias correction.
- **For contrast** (`noisy_split_top1`): the same images scored plainly against their given labels,
  each weighted by its class's share of the training set over its share of the split, i.e. the
  expected top-1 of a uniform random split of the noisy labels: what teams measured.
- **Evaluated as the submission is** (`evaluate`: app/infer.predict_logits at the trained size,
  balanced logits with `infer.tau`, one view per image): after every fine-tuning epoch, on the
  weights that would be exported (the average, when averaging is on), and on the exported model file.

Why this weighting (TECH_REPORT.md sections 2.6 and 4.5; bench/estimate_gap.py): a split drawn
among the images the noise stage keeps, scored plainly, reads high (over 10 proxy models 6.7 points
on average, +0.4 to +12 by model: the kept images are the easier ones, more so for some models); a
plain noisy split reads 6.8 low; a random split weighted by the clean scores read 2.7 points off,
Spearman 0.76, on those models. A per-class ratio sum(score x right) / sum(score) cancels the weight
of a class's only image and reads 8-14 points low at one image a class (frozen probes against truly
clean train images); this normalised pooled ratio is within +0.4 to +3.1 points of them at one and
at three images a class.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .infer import predict_logits

Z95 = 1.959964            # two-sided 95% normal quantile
SPLIT_STREAM = 0x0A15E    # the split's random stream for a seed (an arbitrary constant, fixed forever)


def enabled(cfg: dict) -> bool:
    return bool(cfg["validation"]["per_class"])


def per_class_counts(labels: np.ndarray, num_classes: int, vcfg: dict) -> np.ndarray:
    """Images each class gives to the split: per_class, at most max_class_share of the class's
    images, per_class lowered for every class until the split is at most max_fraction of the images."""
    sizes = np.bincount(labels, minlength=num_classes)
    cap = np.floor(vcfg["max_class_share"] * sizes).astype(int)
    for k in range(int(vcfg["per_class"]), 0, -1):
        counts = np.minimum(k, cap)
        if counts.sum() <= vcfg["max_fraction"] * len(labels):
            return counts
    return np.zeros(num_classes, dtype=int)


def class_subset_counts(labels: np.ndarray, num_classes: int, vcfg: dict, rng) -> np.ndarray:
    """One image from each of a uniform draw of classes, as many as max_fraction of the images allows,
    among the classes max_class_share lets give one: the split of a set too small for one image in
    every class (e.g. 3,296 images in 102 classes at 3%: 98 classes). The estimate weighs every class
    in the split alike, so a uniformly drawn subset of classes stands for all of them: unbiased for
    the class-balanced top-1, its interval that of the images drawn."""
    sizes = np.bincount(labels, minlength=num_classes)
    eligible = np.flatnonzero(np.floor(vcfg["max_class_share"] * sizes) >= 1)
    take = min(len(eligible), int(vcfg["max_fraction"] * len(labels)))
    counts = np.zeros(num_classes, dtype=int)
    counts[rng.choice(eligible, size=take, replace=False)] = 1
    return counts


def validation_split(labels: np.ndarray, num_classes: int, vcfg: dict, seed: int) -> np.ndarray:
    """Row indices (sorted) of the split: per class, a uniform draw of per_class_counts images among
    all its images, whatever their clean score; when not every class can give one within the caps,
    one image from each of a uniform draw of classes (class_subset_counts). Deterministic for a seed."""
    rng = np.random.default_rng([seed, SPLIT_STREAM])
    counts = per_class_counts(labels, num_classes, vcfg)
    if not counts.any() and int(vcfg["per_class"]) > 0:
        counts = class_subset_counts(labels, num_classes, vcfg, rng)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in enumerate(counts) if k]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=int)


@dataclass(frozen=True)
class ValidationSplit:
    rows: np.ndarray           # row indices of `images`, evaluated against their given labels
    held_out: np.ndarray       # bool per row: the split and every byte-identical copy of its images

    def summary(self, images: pd.DataFrame, num_classes: int) -> dict:
        part = images.iloc[self.rows]
        per_class = np.bincount(part["label"], minlength=num_classes)
        return {"split_images": len(self.rows), "classes_covered": int((per_class > 0).sum()),
                "classes": num_classes, "per_class_max": int(per_class.max(initial=0)),
                "split_mean_clean_score": round(float(part["clean_score"].mean()), 4) if len(part) else None,
                "held_out_images": int(self.held_out.sum()),
                "held_out_share": round(float(self.held_out.mean()), 4) if len(images) else 0.0}


def choose_split(images: pd.DataFrame, num_classes: int, cfg: dict) -> ValidationSplit | None:
    """This run's validation split (None when `validation.per_class` is 0, or when the data are too
    few for even one image in a class within the caps)."""
    if not enabled(cfg):
        return None
    rows = validation_split(images["label"].to_numpy(), num_classes, cfg["validation"], cfg["seed"])
    if not len(rows):
        return None
    hashes = images["hash"].to_numpy()
    return ValidationSplit(rows, np.isin(hashes, hashes[rows]))


def wilson_interval(p: float, n: float, z: float = Z95) -> list[float]:
    """Wilson's score interval of a proportion p observed on n (effective) trials."""
    if n <= 0:
        return [0.0, 1.0]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def split_weights(labels: np.ndarray, clean_score: np.ndarray, class_mean_score: np.ndarray) -> np.ndarray:
    """Each split image's weight in the estimate: u = clean score / (its class's count in the split x
    the class's mean clean score over all its training images). Every class's expected weight is 1
    (class-balanced, however clean the class), a wrong label weighs little, and with one image a
    class its weight still counts (a per-class ratio would cancel it)."""
    labels = np.asarray(labels)
    mean = np.asarray(class_mean_score, float)[labels]
    counts = np.bincount(labels)[labels]
    return np.divide(np.asarray(clean_score, float), counts * mean, out=np.zeros(len(labels)), where=mean > 0)


def kish_size(u: np.ndarray) -> float:
    """Kish's effective sample size of weights u: sum(u)^2 / sum(u^2)."""
    return float(u.sum() ** 2 / np.sum(u ** 2))


@dataclass(frozen=True)
class ProbeCovariate:
    """The control variate: whether the noise stage's out-of-fold frozen probe agrees with each split
    image's given label (`right`), and, per class, the clean-score-weighted rate of that agreement over
    ALL the class's images (`class_rate`: sum(score x agrees) / sum(score)), which is exactly what the
    split's weighted agreement estimates. Known for every image without the fine-tuned model, so the
    split's luck of the draw (easier or harder images than its classes hold) shows in it."""
    right: np.ndarray
    class_rate: np.ndarray


def _weighted_mean(values: np.ndarray, u: np.ndarray, probe: ProbeCovariate | None, labels: np.ndarray):
    """(sum(u x values) / sum(u), corrected by the control variate when given; its linearised
    variance; the variance without the control variate). Regression estimator (Cochran 1977, 7.1):
    m - beta (x - mu), m and x the split's weighted means of the values and of the probe's agreement,
    mu their known mean over the classes' images, beta the weighted least-squares slope of the values
    on the agreement within the split. Residual variance sum(u^2 e^2) / sum(u)^2."""
    total = float(u.sum())
    m = float(np.sum(u * values)) / total
    plain = float(np.sum(u ** 2 * (values - m) ** 2)) / total ** 2
    if probe is None:
        return m, plain, plain
    x = np.asarray(probe.right, float)
    xm = float(np.sum(u * x)) / total
    spread = float(np.sum(u * (x - xm) ** 2))
    beta = float(np.sum(u * (x - xm) * (values - m))) / spread if spread > 0 else 0.0
    mu = float(np.mean(np.asarray(probe.class_rate, float)[np.unique(labels)]))   # the classes in the split
    residual = values - m - beta * (x - xm)
    return m - beta * (xm - mu), float(np.sum(u ** 2 * residual ** 2)) / total ** 2, plain


def estimate_top1(correct: np.ndarray, labels: np.ndarray, clean_score: np.ndarray,
                  class_mean_score: np.ndarray, probe: ProbeCovariate | None = None) -> tuple[float, list[float]]:
    """(the estimated clean, class-balanced top-1, its 95% Wilson interval) of split images with
    given `labels`: sum(u x correct) / sum(u), u = split_weights, corrected with the probe's control
    variate when given (`_weighted_mean`). The interval is Wilson's at the Kish size
    sum(u)^2 / sum(u^2), enlarged by the variance the control variate removes."""
    estimate, size = estimate_with_size(correct, labels, clean_score, class_mean_score, probe)
    if math.isnan(estimate):
        return estimate, [0.0, 1.0]
    return estimate, wilson_interval(min(1.0, max(0.0, estimate)), size)


def estimate_with_size(correct: np.ndarray, labels: np.ndarray, clean_score: np.ndarray,
                       class_mean_score: np.ndarray, probe: ProbeCovariate | None = None) -> tuple[float, float]:
    """(estimate_top1's estimate, its effective size: the Kish size sum(u)^2 / sum(u^2) divided by the
    share of the variance the control variate leaves, residual over plain linearised variance)."""
    u = split_weights(labels, clean_score, class_mean_score)
    if not u.sum() > 0:
        return float("nan"), 0.0
    estimate, variance, plain = _weighted_mean(np.asarray(correct, float), u, probe, labels)
    left = variance / plain if plain > 0 else 1.0
    return estimate, kish_size(u) / max(left, 1e-3)


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, labels: np.ndarray, clean_score: np.ndarray,
                      class_mean_score: np.ndarray, probe: ProbeCovariate | None = None) -> tuple[float, list[float]]:
    """(estimate of model A minus estimate of model B, its 95% interval) on ONE split scored by both:
    sum(u x (right_A - right_B)) / sum(u) (with the control variate: estimate_top1(A) - estimate_top1(B)
    exactly, the slope being linear in the values). Only the images where the two models differ
    move it, so its sampling error is far smaller than either estimate's: the way to rank two runs
    of the same data and seed (`python -m app compare`). Normal interval with the linearised variance."""
    u = split_weights(labels, clean_score, class_mean_score)
    if not u.sum() > 0:
        return float("nan"), [-1.0, 1.0]
    d = np.asarray(correct_a, float) - np.asarray(correct_b, float)
    delta, variance, _ = _weighted_mean(d, u, probe, labels)
    half = Z95 * math.sqrt(variance)
    return delta, [max(-1.0, delta - half), min(1.0, delta + half)]


def class_mean_scores(labels: np.ndarray, clean_score: np.ndarray) -> np.ndarray:
    """Each class's mean clean score over all its images (0 for a class without images)."""
    counts = np.bincount(labels)
    return np.divide(np.bincount(labels, weights=clean_score), counts, out=np.zeros(len(counts)), where=counts > 0)


def probe_covariate(images: pd.DataFrame, rows: np.ndarray) -> ProbeCovariate | None:
    """The control variate of the split `rows` of `images` (columns label, clean_score, probe_label);
    None when the noise stage gave no probe labels (-1: an earlier run's noise.csv)."""
    probe, labels = images["probe_label"].to_numpy(int), images["label"].to_numpy()
    if (probe < 0).any():
        return None
    agrees = (probe == labels).astype(float)
    score = images["clean_score"].to_numpy(float)
    total = np.bincount(labels, weights=score)
    rate = np.divide(np.bincount(labels, weights=score * agrees), total, out=np.zeros(len(total)), where=total > 0)
    return ProbeCovariate(agrees[rows], rate)


def too_uncertain(interval, summary: dict, vcfg: dict) -> str | None:
    """None when the 95% interval is within +-validation.warn_half_width; else what that means and the
    settings that would narrow it (the interval shrinks as one over the square root of the split's
    images). `summary`: ValidationSplit.summary."""
    half, wanted = (interval[1] - interval[0]) / 2, vcfg["warn_half_width"]
    if half <= wanted:
        return None
    n, classes = summary["split_images"], summary["classes"]
    images = summary["held_out_images"] / summary["held_out_share"] if summary["held_out_share"] else n
    needed = math.ceil(n * (half / wanted) ** 2)
    per_class = math.ceil(needed / classes)
    fraction = math.ceil(100 * needed / max(1.0, images)) / 100
    return (f"the estimate is too uncertain to use: its 95% interval is +-{100 * half:.0f} points "
            f"({n} held-out images), wider than +-{100 * wanted:.0f}. About {needed} held-out images would "
            f"narrow it to +-{100 * wanted:.0f}: --set validation.per_class={per_class} --set "
            f"validation.max_fraction={min(1.0, fraction):g} (each held-out image is one fewer to train on); "
            f"`python -m app compare` ranks runs on the same split with a paired, narrower interval")


def noisy_split_top1(correct: np.ndarray, labels: np.ndarray, class_sizes: np.ndarray) -> float:
    """Plain top-1 against the given labels, each image weighted by its class's training-set size
    over its count in the split: the expected top-1 of a uniform random split (what teams did)."""
    drawn = np.bincount(labels, minlength=len(class_sizes))
    weight = class_sizes[labels] / drawn[labels]
    return float(np.sum(weight * correct) / np.sum(weight))


def evaluate(model, meta: dict, root, images: pd.DataFrame, split: ValidationSplit, cfg: dict,
             accelerator, with_predictions: bool = False) -> dict:
    """The estimate and the contrast of `model` (a Classifier) on the split, inferred as run_infer.sh
    does by default: the eval transform at the trained size, balanced logits with infer.tau, one view
    per image. Every process calls it (the images are shared out and the logits gathered). `meta`:
    visual_config and preprocess of the model (what its model file holds). With `with_predictions`,
    also the predicted class index of every split image."""
    infer_cfg = {**cfg, "infer": {**cfg["infer"], "tta": "none"}}
    was_training = model.training
    model.eval()
    logits, _, _ = predict_logits(model, meta, [Path(root) / p for p in images["path"].to_numpy()[split.rows]],
                                  infer_cfg, accelerator, what="validation split")
    model.train(was_training)
    predicted = logits.argmax(1)
    labels = images["label"].to_numpy()
    correct = predicted == labels[split.rows]
    score = images["clean_score"].to_numpy(float)
    means = class_mean_scores(labels, score)
    probe = probe_covariate(images, split.rows)
    estimate, interval = estimate_top1(correct, labels[split.rows], score[split.rows], means, probe)
    plain, _ = estimate_top1(correct, labels[split.rows], score[split.rows], means)
    noisy = noisy_split_top1(correct, labels[split.rows], np.bincount(labels))
    result = {"estimated_test_top1": round(estimate, 4),
              "estimated_test_top1_interval95": [round(x, 4) for x in interval],
              "estimate_without_control_variate": round(plain, 4), "noisy_split_top1": round(noisy, 4)}
    if with_predictions:
        result["predicted"] = predicted
    return result


def split_table(images: pd.DataFrame, split: ValidationSplit, classes, predicted: np.ndarray) -> pd.DataFrame:
    """validation_split.csv: one row per split image, its clean score, its class's mean clean score
    and the exported model's prediction (what the estimate is computed from)."""
    part = images.iloc[split.rows]
    labels = images["label"].to_numpy()
    class_mean = class_mean_scores(labels, images["clean_score"].to_numpy(float))
    table = pd.DataFrame({
        "path": part["path"].to_numpy(),
        "given_label": [classes[i] for i in part["label"]],
        "clean_score": part["clean_score"].to_numpy(float),
        "class_mean_score": class_mean[part["label"].to_numpy()],
        "predicted": [classes[i] for i in predicted],
    })
    probe = probe_covariate(images, split.rows)
    if probe is not None:
        table["probe_agrees"] = probe.right.astype(int)
        table["class_probe_rate"] = probe.class_rate[part["label"].to_numpy()]
    return table
