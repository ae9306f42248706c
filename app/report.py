"""Reports people read: JSON next to a PNG."""
import json
import platform
import resource
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .outputs import atomic_write  # noqa: E402


def write_json(path, obj) -> None:
    text = json.dumps(obj, indent=2, default=str)
    with atomic_write(path) as f:
        f.write(text)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB): Linux's VmHWM, which exec resets. Not
    ru_maxrss there: Linux carries it over from the parent through fork + exec, so a process started
    by a bigger one (accelerate launch, the bench, a spawned worker) would report the parent's peak."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 3)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return round(kib / (2**30 if sys.platform == "darwin" else 2**20), 3)


def cpu_name() -> str:
    """The CPU model, for reports that name their machine."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())


def plot_train_curves(warmup_losses, finetune_history, out_png, estimate: dict | None = None) -> None:
    """Warmup loss, fine-tuning losses, learning rates and, with a validation split (`estimate`: the
    exported model's figures), the estimated test top-1 per epoch beside the noisy split's."""
    fig, axes = plt.subplots(1, 4 if estimate else 3, figsize=(18.5 if estimate else 14, 3.8))
    axes[0].plot(range(1, len(warmup_losses) + 1), warmup_losses)
    axes[0].set(title="head warmup (frozen features)", xlabel="epoch", ylabel="weighted CE")
    epochs = [h["epoch"] for h in finetune_history]
    for key in ("loss", "cls_loss"):
        axes[1].plot(epochs, [h[key] for h in finetune_history], marker="o", label=key)
    ax2 = axes[1].twinx()
    ax2.plot(epochs, [h["delta_penalty"] for h in finetune_history], color="grey", ls="--",
             label="||delta||^2")
    ax2.set_ylabel("||merged - pretrained||^2")
    axes[1].set(title="LoRA fine-tuning", xlabel="epoch", ylabel="loss")
    axes[1].legend(loc="upper left")
    axes[2].plot(epochs, [h["lr"] for h in finetune_history], marker="o", label="LoRA lr (epoch end)")
    axes[2].plot(epochs, [h["head_lr"] for h in finetune_history], marker="o", label="head lr")
    axes[2].set(title="learning rate", xlabel="epoch")
    axes[2].legend()
    if estimate:
        _plot_estimate(axes[3], finetune_history, estimate)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _percent(fractions) -> list:
    return [100 * f for f in fractions]


def _plot_estimate(ax, history, estimate: dict) -> None:
    """Estimated test top-1 per epoch with its 95% band, the noisy split's top-1, and model.pt's."""
    scored = [h for h in history if "estimated_test_top1" in h]
    epochs = [h["epoch"] for h in scored]
    ax.plot(epochs, _percent(h["estimated_test_top1"] for h in scored), marker="o", color="tab:green",
            label="estimated test top-1 (clean-score weighted)")
    ax.fill_between(epochs, _percent(h["estimated_test_top1_interval95"][0] for h in scored),
                    _percent(h["estimated_test_top1_interval95"][1] for h in scored), color="tab:green", alpha=0.15,
                    label="95% interval")
    ax.plot(epochs, _percent(h["noisy_split_top1"] for h in scored), marker="s", color="tab:red", ls="--",
            label="noisy labels, plain (contrast)")
    last = epochs[-1] if epochs else 0
    value, (low, high) = estimate["estimated_test_top1"], estimate["estimated_test_top1_interval95"]
    ax.errorbar([last], [100 * value], yerr=[[100 * (value - low)], [100 * (high - value)]],
                marker="*", markersize=12, color="black", capsize=4, ls="none", label="model.pt")
    ax.set(title="held-out top-1 (inferred like the submission)", xlabel="epoch", ylabel="top-1 %")
    ax.legend(fontsize=7)
