"""The boxes, arrows and colours every diagram of tools/diagrams.py and tools/diagrams_parallel.py is drawn with."""

import matplotlib

matplotlib.use("Agg")  # files only: no display, and the same renderer everywhere
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

BLUE, ORANGE, GREEN, RED, PURPLE, GREY = "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#8C8C8C"
LIGHT = {BLUE: "#DCE6F2", ORANGE: "#F8E3D3", GREEN: "#DDEEDF", RED: "#F3DADB", PURPLE: "#E6E2F0", GREY: "#EEEEEE"}


def canvas(width: float, height: float, xmax: float, ymax: float):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, ymax)
    ax.set_axis_off()
    return fig, ax


def box(ax, x, y, w, h, text, color=BLUE, size=9, fill=None, weight="normal"):
    """A rounded box with its lower-left corner at (x, y) and centred text."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=fill or LIGHT.get(color, "white"), ec=color, lw=1.4))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight)


def arrow(ax, start, end, color="black", text=None, size=8, style="-|>", ls="-", offset=(0.08, 0)):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color=color, lw=1.2, ls=ls,
                                                          shrinkA=0, shrinkB=0))
    if text:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], text, fontsize=size,
                color=color, va="center")
