"""The noise stage: per-image clean scores, cross-class duplicate resolution, off-topic detection
(detect.py tells how the signals combine)."""
from .detect import FLAGS, NOISE_DEFAULTS, compute_signals, detect_noise
from .report import plot_noise_report

__all__ = ["FLAGS", "NOISE_DEFAULTS", "compute_signals", "detect_noise", "plot_noise_report"]
