"""The report's figures, drawn with matplotlib (Agg) and returned as PNG bytes (None when there is no data).

* ``leakage_vs_split`` — BLEU-4, ROUGE-L and token accuracy per attack versus the client head depth k (k=0:
  embedding only), no defense, as grouped bars with 95 % intervals, the blind baseline beside them;
* ``frontier_figure`` / ``frontier_png`` — per threat, one panel per defense: utility cost versus the strongest
  attack's leakage with error bars, the Pareto frontier marked, no defense in grey, the blind baseline dashed.
"""

from __future__ import annotations

import io
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from reports.frontier import BLIND, pareto  # noqa: E402
from reports.tables import DEPTH_METRICS  # noqa: E402
from reports.verdict import LITTLE, MOST  # noqa: E402

_DPI = 200
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def leakage_vs_split(data: pd.DataFrame) -> bytes | None:
    """``data``: ``tables.leakage_by_split``. Three panels (BLEU-4, ROUGE-L, token accuracy) of grouped bars, one
    bar per attack at each split with its 95 % interval as an error bar; the blind baseline is drawn as a grey
    hatched bar beside them (what a guess from public text gets)."""
    if data.empty:
        return None
    attacks = [a for a in dict.fromkeys(data["attack_label"]) if a != BLIND] + \
        [a for a in dict.fromkeys(data["attack_label"]) if a == BLIND]
    splits = sorted(data["head_blocks"].unique())
    width = 0.8 / len(attacks)
    cmap = plt.get_cmap("tab10" if len(attacks) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(DEPTH_METRICS), figsize=(11, 3.6))
    for ax, (metric, title, scale) in zip(axes, DEPTH_METRICS, strict=True):
        for i, name in enumerate(attacks):
            s = data[data["attack_label"] == name].set_index("head_blocks")
            ks = [k for k in splits if k in s.index]
            xs = [splits.index(k) + (i - (len(attacks) - 1) / 2) * width for k in ks]
            ys = [float(s.loc[k, metric]) for k in ks]
            err = [[max(0.0, y - float(s.loc[k, metric + "_lo"])) for k, y in zip(ks, ys, strict=True)],
                   [max(0.0, float(s.loc[k, metric + "_hi"]) - y) for k, y in zip(ks, ys, strict=True)]]
            style = {"color": "0.75", "hatch": "//", "edgecolor": "0.4"} if name == BLIND else \
                {"color": cmap(i % cmap.N)}
            ax.bar(xs, ys, width * 0.95, yerr=err, capsize=1.5, error_kw={"elinewidth": 0.6}, label=name, **style)
        ax.set_xticks(range(len(splits)))
        ax.set_xticklabels([f"k={k}\n(embedding only)" if k == 0 else f"k={k}" for k in splits], fontsize=8)
        ax.set_title(f"{title} (no defense)", fontsize=10)
        ax.set_ylim(0, 1.05 * scale)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("higher = more of the private text recovered", fontsize=8)
    fig.supxlabel("client head: embedding + k decoder blocks (each attack at the threat where it is strongest)",
                  fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(attacks)),
               fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def _natural(label: str) -> list:
    """Sort key that orders 'eta=10' < 'eta=30' < 'eta=100'."""
    return [(0, float(p), "") if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", p) else (1, 0.0, p)
            for p in re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", label) if p]


def frontier_figure(s: pd.DataFrame):
    """The privacy-utility frontier of one threat (``frontier.settings`` rows of that threat): one panel per
    defense, x = held-out perplexity increase over the undefended cell of the same split, y = the strongest
    attack's leakage (advantage over blind where measured), error bars from the 95 % intervals, the Pareto
    frontier (over that defense's settings and no defense) as a line through ringed points; the blind baseline
    as a dashed line. Returns the matplotlib Figure (None without a costed point); ``frontier_png`` renders it."""
    s = s.dropna(subset=["cost", "leak"])
    names = sorted(set(s.loc[~s["is_none"], "defense"]))
    if s.empty or not names:
        return None
    base = s[s["is_none"]]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False, sharey=True)
    splits = sorted(s["head_blocks"].unique())
    marker = {k: _MARKERS[i % len(_MARKERS)] for i, k in enumerate(splits)}
    cmap = plt.get_cmap("tab10")
    advantage = (s["kind"] == "advantage").all()
    lo_y = min(-0.05, float(s["leak_lo"].min()) - 0.03)

    def bars(ax, g, color, label, z):
        for k, gk in g.groupby("head_blocks"):
            x, y = 100 * gk["cost"].astype(float), gk["leak"].astype(float)
            xerr = [(x - 100 * gk["cost_lo"].astype(float)).clip(lower=0).fillna(0),
                    (100 * gk["cost_hi"].astype(float) - x).clip(lower=0).fillna(0)]
            yerr = [(y - gk["leak_lo"].astype(float)).clip(lower=0), (gk["leak_hi"].astype(float) - y).clip(lower=0)]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker[k], color=color, ecolor=color, elinewidth=0.8,
                        capsize=2, ms=5, mec="black", mew=0.4, zorder=z, label=None)
        ax.plot([], [], color=color, marker="o", ls="", label=label)

    for ax, name in zip(axes.flat, names, strict=False):
        ax.axhspan(MOST, 1.1, color="#d62728", alpha=0.06, lw=0)
        ax.axhspan(lo_y, LITTLE, color="#2ca02c", alpha=0.07, lw=0)
        mine = s[s["defense"] == name]
        if not base.empty:
            bars(ax, base, "0.55", "no defense", 2)
        groups = sorted(mine.groupby("defense_label"), key=lambda lg: _natural(lg[0]))
        for i, (label, g) in enumerate(groups):
            bars(ax, g, cmap(i % 10), label.removeprefix(name).strip(" ()") or name, 3)
        both = pd.concat([base, mine])
        front = both[pareto(both)].sort_values("cost")
        if not front.empty:
            ax.step(100 * front["cost"].astype(float), front["leak"].astype(float), where="post", color="black",
                    lw=1.0, ls="-", alpha=0.7, zorder=1, label="Pareto frontier")
            ax.scatter(100 * front["cost"].astype(float), front["leak"].astype(float), s=110, facecolors="none",
                       edgecolors="black", linewidths=0.9, zorder=4)
        if advantage:
            ax.axhline(0, color="0.3", ls="--", lw=0.8, label="blind (advantage 0)")
        elif s["blind"].notna().any():
            ax.axhline(float(s["blind"].max()), color="0.3", ls="--", lw=0.8, label="blind attack")
        ax.set_title(name, fontsize=10)
        ax.set_ylim(lo_y, 1.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best", framealpha=0.85)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("held-out perplexity increase over no defense (%)", fontsize=7)
        x0, x1 = ax.get_xlim()
        if x1 - x0 < 5:  # all points at about the same cost: show a few percent around them, not 0.001 %
            ax.set_xlim(min(x0, -2.5), max(x1, 2.5))
    ylabel = "token accuracy advantage\nover blind (strongest attack)" if advantage else \
        "token accuracy of the\nstrongest attack"
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color="black", marker=marker[k], ls="", label=f"k={k}") for k in splits]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(splits), fontsize=8,
               frameon=False, title="marker = split (client head blocks); ringed = on the Pareto frontier",
               title_fontsize=8)
    fig.tight_layout()
    return fig


def frontier_png(s: pd.DataFrame) -> bytes | None:
    fig = frontier_figure(s)
    return None if fig is None else _png(fig)
