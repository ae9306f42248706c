"""noise_report.png: what the noise stage found, for a person to look at."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .detect import FLAGS


def plot_noise_report(scores_df, image_paths, class_names, out_png) -> None:
    """noise_report.png: per-class noise rates, clean-score histogram, most confidently flagged thumbnails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    df = scores_df.reset_index(drop=True).copy()
    paths = list(image_paths)
    if "given_label" in df.columns:
        lab = df["given_label"].to_numpy()
    elif "label" in df.columns:
        lab = df["label"].to_numpy()
    elif len(scores_df.attrs.get("given_label", [])) == len(df):
        lab = np.asarray(scores_df.attrs["given_label"])
    else:
        lab = np.full(len(df), -1, np.int64)  # unknown: one bar
    names = list(class_names) if class_names is not None else []

    def cname(c):
        """Display name of a label given as class index or as class name ('' / NaN / -1 = none)."""
        if c is None or (isinstance(c, float) and np.isnan(c)) or str(c).strip() in ("", "-1", "nan"):
            return None
        if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.lstrip("-").isdigit() and str(c) not in names):
            ci = int(c)
            return str(names[ci]) if 0 <= ci < len(names) else str(ci)
        return str(c)

    n_thumb_cols, n_thumb_rows = 8, 3
    fig = plt.figure(figsize=(16, 6 + 2.2 * n_thumb_rows))
    gs = fig.add_gridspec(1 + n_thumb_rows, n_thumb_cols, height_ratios=[3.0] + [1.0] * n_thumb_rows)
    # per-class noise rates (stacked by flag)
    ax = fig.add_subplot(gs[0, : n_thumb_cols // 2 + 1])
    if len(df):
        tab = pd.crosstab(pd.Series([cname(v) for v in lab], name="class"), df["flag"].to_numpy())
        tab = tab.reindex(columns=list(FLAGS), fill_value=0)
        rate = tab.drop(columns=["clean"]).div(tab.sum(axis=1), axis=0)
        order = rate.sum(axis=1).sort_values(ascending=False).index
        rate = rate.loc[order]
        bottom = np.zeros(len(rate))
        colors = {"suspect_label": "tab:orange", "off_topic": "tab:red", "duplicate": "tab:purple"}
        for col in ["suspect_label", "off_topic", "duplicate"]:
            ax.bar(np.arange(len(rate)), rate[col].to_numpy(), bottom=bottom, width=1.0, color=colors[col], label=col)
            bottom += rate[col].to_numpy()
        overall = float((df["flag"] != "clean").mean())
        ax.axhline(overall, color="k", lw=0.8, ls="--", label=f"overall {overall:.1%}")
        ax.set_xlim(-0.5, len(rate) - 0.5)
        if len(rate) <= 40:
            ax.set_xticks(np.arange(len(rate)), [str(c) for c in rate.index], rotation=90, fontsize=6)
        else:
            ax.set_xticks([])
        ax.set_xlabel(f"classes, sorted by flagged rate ({len(rate)} classes)")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_ylabel("flagged fraction")
    ax.set_title("per-class noise rates")
    # histogram of clean scores
    ax = fig.add_subplot(gs[0, n_thumb_cols // 2 + 1:])
    if len(df):
        bins = np.linspace(0, 1, 41)
        for fl, col in [("clean", "tab:green"), ("suspect_label", "tab:orange"), ("off_topic", "tab:red"),
                        ("duplicate", "tab:purple")]:
            v = df.loc[df["flag"] == fl, "clean_score"].to_numpy()
            if len(v):
                ax.hist(v, bins=bins, color=col, alpha=0.6, label=f"{fl} ({len(v)})")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("clean_score")
    ax.set_title("clean-score histogram")
    # thumbnails of the most confidently flagged, one row per flag kind (lowest clean_score first)
    kinds = [f for f in FLAGS[1:] if (df["flag"] == f).any()] or ["suspect_label"]
    rows = []
    for r_i in range(n_thumb_rows):
        f = kinds[r_i % len(kinds)]
        idx = df.index[df["flag"] == f].to_numpy()
        idx = idx[np.argsort(df.loc[idx, "clean_score"].to_numpy(dtype=float), kind="stable")]
        start = (r_i // len(kinds)) * n_thumb_cols
        rows.append(list(idx[start:start + n_thumb_cols]))
    for r_i, row_idx in enumerate(rows):
        for j in range(n_thumb_cols):
            ax = fig.add_subplot(gs[1 + r_i, j])
            ax.axis("off")
            if j >= len(row_idx):
                continue
            i = int(row_idx[j])
            try:
                with Image.open(paths[i]) as im:
                    im = im.convert("RGB")
                    im.thumbnail((128, 128))
                    ax.imshow(np.asarray(im))
            except Exception:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
            row = df.loc[i]
            sug = cname(row.get("suggested_label", None))
            s = f"{row['flag']} {float(row['clean_score']):.3f}\nlabel {cname(lab[i])}"
            if sug is not None:
                s += f" -> {sug}"
            ax.set_title(s, fontsize=6)
    fig.suptitle(f"noise report: {len(df)} images, {int((df['flag'] != 'clean').sum())} flagged", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
