"""compare's chart (scores.png): what each model gained and lost against the first one, in one picture
a person can put on a slide. One panel per compared model; one bar per measured set (your data
first, then the general-ability check), its length the relative change of the score, signed so that
right is better (a lower perplexity, a higher accuracy), green when better and red when worse; each
bar says the two values and each set its size. One score per set: perplexity and bits/byte of a
text are one measurement (the table in report.md has both), so the chart shows perplexity only."""

import textwrap
from pathlib import Path
from typing import List, Optional

from llama.common.files import atomic_write
from llama.eval import EvalError

GAIN, LOSS = "#2e7d32", "#c62828"  # green, red; the bar's label also says "better"/"worse"


def gain_percent(base: float, new: float, kind: str) -> float:
    """The change of a score against the base, in percent of the base, positive when better."""
    if base == 0:
        return 0.0 if new == 0 else 100.0 * (1 if (new > 0) == (kind == "accuracy") else -1)
    rel = 100.0 * (new - base) / abs(base)
    return -rel if kind == "perplexity" else rel


def verdict(gain: float) -> str:
    """Words for a gain_percent: 'better by 62.8%', 'worse by 0.1%', 'the same'."""
    return "the same" if gain == 0 else f"{'better' if gain > 0 else 'worse'} by {abs(gain):.1f}%"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError("the chart needs matplotlib: pip install 'llama-ref[eval]' (or matplotlib)") from None
    return plt


def _fmt(v: float, kind: str) -> str:
    return f"{v:.2f}" if kind == "perplexity" else f"{100 * v:.1f}%"


def write_chart(rows: List[dict], measures, path: Path) -> Optional[Path]:
    """scores.png for compare's rows (the first is the base); None when there is nothing to compare
    (one model, or no scores)."""
    if len(rows) < 2 or not measures:
        return None
    plt = _pyplot()
    base = rows[0]
    n = len(measures)
    fig, axes = plt.subplots(len(rows) - 1, 1, figsize=(10, (1.6 + 0.6 * n) * (len(rows) - 1)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows[1:]):
        labels, gains, notes = [], [], []
        for m in measures:
            s_base, s_new = base["scores"][m.key], row["scores"][m.key]
            b, v = (s_base["perplexity"], s_new["perplexity"]) if m.kind == "perplexity" else (s_base["acc"], s_new["acc"])
            count = f"{s_base['tokens']:,} tokens" if m.kind == "perplexity" else f"{s_base['items']:,} questions"
            labels.append(f"{m.title}\n{m.kind}, {count}")
            gains.append(gain_percent(b, v, m.kind))
            notes.append(f"{_fmt(b, m.kind)} → {_fmt(v, m.kind)}: {verdict(gains[-1])}")
        y = list(range(n))[::-1]  # the first measure on top
        ax.barh(y, gains, color=[GAIN if g > 0 else LOSS for g in gains], height=0.6)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        span = max(max(abs(g) for g in gains), 1.0)
        ax.set_xlim(-2.2 * span, 2.2 * span)  # room for the labels beside the bars
        for yi, g, note in zip(y, gains, notes):  # the values, beside the bar's end
            ax.text(g + (0.03 if g >= 0 else -0.03) * span, yi, note, va="center", fontsize=8,
                    ha="left" if g >= 0 else "right")
        ax.set_xlabel(f"change against {base['label']}, % of its score (right: better; perplexity lower, "
                      "accuracy higher)", fontsize=8)
        ax.set_title(textwrap.fill(f"{row['label']} against {base['label']}: gained (green) and lost (red)", 75),
                     fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path
