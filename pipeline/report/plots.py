"""The report's PNG plots (matplotlib, Agg backend) from the gathered summary: loss curves, test perplexity
(log scale), the evaluation matrix."""
from __future__ import annotations

import io
import math

from pipeline.report.gather import as_number
from pipeline.report.tables import wrap

# one colour per pipeline.status.STATES word
STATUS_COLORS = {"finished": "#1a7f37", "failed": "#cf222e", "skipped": "#9a6700", "interrupted": "#bc4c00",
                 "running": "#0969da", "stale": "#8250df", "not started": "#6e7781", "unknown": "#6e7781"}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def plot_loss_curves(summary: dict) -> bytes:
    plt = _plt()
    doms = list(summary["domains"].values())
    cols = min(2, max(1, len(doms)))
    rows = math.ceil(len(doms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    for ax, d in zip(axes.flat, doms):
        h = d["_history"]
        tr = [(x.get("step"), as_number(x.get("loss"))) for x in h["train"] if as_number(x.get("loss")) is not None]
        va = [(x.get("step"), as_number(x.get("loss"))) for x in h["val"] if as_number(x.get("loss")) is not None]
        ax.set_title(f"{d['domain']} ({d['status']})", color=STATUS_COLORS.get(d["status"], "black"), fontsize=11)
        if not tr and not va:
            msg = d.get("cause") or "no loss history"
            ax.text(0.5, 0.5, wrap(msg, 48), ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#57606a")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if tr:
            ax.plot(*zip(*tr), label="train", color="#0969da", lw=1.4)
        if va:
            ax.plot(*zip(*va), label="val", color="#bf3989", marker="o", ms=4, lw=1.4)
        if d.get("base_val_loss") is not None:
            ax.axhline(d["base_val_loss"], color="#6e7781", ls="--", lw=1, label="base val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(doms):]:
        ax.axis("off")
    fig.suptitle("Loss curves per domain (train and validation)", fontsize=12)
    fig.tight_layout()
    return _png(fig)


def plot_perplexity(summary: dict) -> bytes:
    plt = _plt()
    doms = list(summary["domains"].values())
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(doms) + 2), 3.8))
    xs = range(len(doms))
    w = 0.38
    base = [d.get("base_test_ppl") for d in doms]
    ada = [d.get("test_ppl") for d in doms]
    # log scale: one domain's perplexity can be 1,000x another's (a linear axis flattens the rest to nothing)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter
    for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):   # 20, 50, 100, not 2x10^1
        axis_fmt(FuncFormatter(lambda v, _: f"{v:g}"))
    floor = min([v for v in base + ada if v], default=1.0)
    b1 = ax.bar([x - w / 2 for x in xs], [v or float("nan") for v in base], w, label="base model", color="#8c959f")
    b2 = ax.bar([x + w / 2 for x in xs], [v or float("nan") for v in ada], w, label="adapter", color="#0969da")
    for bars, vals in ((b1, base), (b2, ada)):
        for rect, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}" if v else "n/a", (rect.get_x() + rect.get_width() / 2, v or floor),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{d['domain']}\n({d['status']})" for d in doms], fontsize=9)
    ax.set_ylabel("test perplexity, log scale (lower is better)")
    ax.margins(y=0.15)
    ax.set_title("Base model vs adapter: test perplexity per domain")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_eval_matrix(matrix: dict) -> bytes:
    plt = _plt()
    models, datasets = list(matrix["models"]), list(matrix["datasets"])
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(4.2, 1.2 * len(datasets) + 2.2), max(3.0, 0.6 * len(models) + 1.6)))
    for ax, key, title in ((axes[0], "loss", "test loss"), (axes[1], "ppl", "test perplexity")):
        vals = [[as_number((matrix.get(key) or {}).get(m, {}).get(d)) for d in datasets] for m in models]
        flat = [v for row in vals for v in row if v is not None]
        grid = [[v if v is not None else float("nan") for v in row] for row in vals]
        im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(datasets)))
        ax.set_xticklabels(datasets, rotation=30, ha="right")
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels([m if m == "base" else f"adapter: {m}" for m in models])
        ax.set_xlabel("test set")
        ax.set_title(title)
        lo, hi = (min(flat), max(flat)) if flat else (0, 1)
        for i, row in enumerate(vals):
            for j, v in enumerate(row):
                txt = "n/a" if v is None else (f"{v:.3f}" if key == "loss" else f"{v:.1f}")
                light = v is not None and hi > lo and (v - lo) / (hi - lo) > 0.5
                ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if light else "black",
                        fontweight="bold" if models[i] == datasets[j] else "normal")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Evaluation matrix: base model and every adapter on every domain's test set (bold: own domain)", fontsize=11)
    fig.tight_layout()
    return _png(fig)
