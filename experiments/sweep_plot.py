"""Line plot of a summary metric against a swept setting, one line per group."""

from __future__ import annotations


def line_plot(summary, x, y, group, path, *, logx=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for g in sorted({s[group] for s in summary}, key=str):
        pts = sorted((s for s in summary if s[group] == g), key=lambda s: float(s[x]))
        ax.errorbar([float(s[x]) for s in pts], [s[y] for s in pts], yerr=[s[y + "_std"] for s in pts],
                    marker="o", capsize=3, label=f"{group}={g}")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
