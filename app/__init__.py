"""Robust fine-tuning of CLIP ViT-B/32 on noisily labelled fine-grained photos.

Pipeline, one module per stage: scan -> features -> noise -> warmup -> finetune (LoRA) -> infer.
"""
import subprocess
from pathlib import Path

__version__ = "0.1.0"


def code_version() -> str:
    """Package version plus the git commit when the code runs from a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+g{sha}" if sha else __version__
