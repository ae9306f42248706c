"""TECH_REPORT.md section 2, the pipeline figure: bench/results/figures/pipeline.png.

    python bench/pipeline_figure.py [--out bench/results/figures/pipeline.png]

Drawn from the stage list below, which names each stage's module in app/ (section 3's table).
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

# (title, module, what comes out); the first five train, the last one infers
STAGES = [
    ("Scan", "app/scan.py", "files, SHA-1,\nbyte copies"),
    ("Frozen\nfeatures", "app/features.py", "224-px features,\ncached (fp16)"),
    ("Noise stage", "app/noise/", "clean score,\nweight, duplicates"),
    ("Validation\nsplit", "app/validation.py", "a few images a\nclass held out"),
    ("Head warmup", "app/warmup.py", "logit-adjusted\nlinear head"),
    ("LoRA\nfine-tuning", "app/finetune.py", "448 px, weighted CE,\npull, EMA -> model.pt"),
    ("Inference,\nbalanced prior", "app/infer.py", "logits - tau log prior\n-> submission.csv"),
]


def draw(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(12, 2.6))
    ax.set_xlim(0, len(STAGES) * 1.7)
    ax.set_ylim(0.3, 3)
    ax.axis("off")
    for i, (title, module, result) in enumerate(STAGES):
        x = 0.1 + i * 1.7
        infer = i == len(STAGES) - 1
        colour = "#dbe9f6" if not infer else "#e3f1df"
        ax.add_patch(FancyBboxPatch((x, 1.25), 1.35, 1.25, boxstyle="round,pad=0.04", fc=colour, ec="0.3"))
        ax.text(x + 0.675, 2.05, title, ha="center", va="center", fontsize=9.5, weight="bold")
        ax.text(x + 0.675, 1.45, module, ha="center", va="center", fontsize=7.5, family="monospace")
        ax.text(x + 0.675, 0.72, result, ha="center", va="center", fontsize=8, color="0.25")
        if i < len(STAGES) - 1:
            ax.annotate("", xy=(x + 1.62, 1.87), xytext=(x + 1.41, 1.87),
                        arrowprops={"arrowstyle": "->", "color": "0.3", "lw": 1.4})
    ax.text(0.1, 2.8, "run_train.sh TRAIN_DIR OUT_DIR  (app/train.py)", fontsize=9, color="#1f4e79")
    ax.text(0.1 + 6 * 1.7 + 1.35, 2.8, "run_infer.sh TEST_DIR OUT_DIR", fontsize=9, color="#2e6b2a", ha="right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=200, bbox_inches="tight")
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "figures" / "pipeline.png"))
    print(draw(Path(p.parse_args().out)))


if __name__ == "__main__":
    main()
