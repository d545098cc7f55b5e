"""The parallelism diagrams of docs/figures/: tensor parallelism's column -> row split with its collectives,
FSDP's all-gather / reduce-scatter timeline, and the TP x FSDP mesh (drawn by tools/diagrams.py)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from llama import parallel  # noqa: E402
from tools.drawing import BLUE, GREEN, GREY, LIGHT, ORANGE, PURPLE, RED, arrow, box, canvas  # noqa: E402

# ---------------------------------------------------------------------------- 4. tensor parallelism


def tensor_parallel() -> plt.Figure:
    """Column- then row-parallel (w1 -> w2 of SwiGLU over 2 ranks) with forward and backward collectives."""
    fig, ax = canvas(11, 5.2, 12, 6)
    ax.set_title("Tensor parallelism over 2 ranks: a column-parallel layer, then a row-parallel one", fontsize=10)
    box(ax, 0.1, 2.6, 1.4, 0.8, "x\n(B, T, D)\nsame on\nboth ranks", GREY, size=8)
    box(ax, 2.0, 2.5, 1.5, 1.0, "f\nfwd: identity\nbwd: ALL-REDUCE\nof dL/dx", PURPLE, size=7.5)
    arrow(ax, (1.5, 3.0), (2.0, 3.0))
    for r, y in ((0, 4.3), (1, 0.9)):
        half = ("0 .. F/2", "F/2 .. F")[r]
        box(ax, 4.1, y, 2.2, 0.9, f"rank {r}: w1, w3 rows\n{half}\nout: (B, T, F/2)", BLUE, size=8)
        box(ax, 6.9, y, 2.2, 0.9, f"rank {r}: w2 columns\n{half}\nout: partial (B, T, D)", RED, size=8)
        arrow(ax, (3.5, 3.0), (4.1, y + 0.45))
        arrow(ax, (6.3, y + 0.45), (6.9, y + 0.45))
        ax.text(6.6, y + 1.05, "silu(w1 x) \u2299 w3 x", ha="center", fontsize=7)
        arrow(ax, (9.1, y + 0.45), (9.5, 3.0))
    box(ax, 9.5, 2.5, 1.5, 1.0, "g\nfwd: ALL-REDUCE\n(sum partials)\nbwd: identity", PURPLE, size=7.5)
    box(ax, 11.2, 2.6, 0.75, 0.8, "y\n(B,T,D)", GREY, size=8)
    arrow(ax, (11.0, 3.0), (11.2, 3.0))
    ax.text(6.0, 3.05, "no communication between the two layers:\nthe column layer's slice is the row layer's input",
            ha="center", va="center", fontsize=8, style="italic")
    ax.text(6.0, 0.15, "per block: attention (wq, wk, wv -> wo) and the FFN (w1, w3 -> w2) each pair this way: forward "
            "2 all-reduces (g after wo, w2);\nbackward one all-reduce per column layer here (f in wq, wk, wv, w1, w3: 5; "
            "Megatron fuses each group's f into one: 2)", ha="center", fontsize=7.5)
    return fig


# ---------------------------------------------------------------------------- 5. FSDP timeline


def fsdp_timeline() -> plt.Figure:
    """What one data-parallel rank does under FSDP (ZeRO-3) in one step of a 3-block model. The
    communication stream runs one collective at a time; FSDP2 prefetches the next block's all-gather
    while the current block computes."""
    gather, fwd, bwd, scatter = 1.4, 2.2, 4.4, 1.6  # durations, arbitrary units: a picture of the order
    comm, compute = [], []
    comm_free, t = 0.0, 0.0  # when the communication and the compute streams are next idle
    ready = {0: gather}
    comm.append((0.0, gather, "all-gather L0", BLUE))
    comm_free = gather
    for b in range(3):  # forward: block b runs once gathered; b + 1's all-gather starts with it
        start = max(t, ready[b])
        if b < 2:
            s = max(comm_free, start)
            comm.append((s, gather, f"all-gather L{b + 1}", BLUE))
            comm_free = ready[b + 1] = s + gather
        compute.append((start, fwd, f"forward L{b}", GREEN))
        t = start + fwd
    forward_end = t
    t += 0.3
    s = max(comm_free, t)
    comm.append((s, gather, "all-gather L2", BLUE))
    comm_free = ready[2] = s + gather
    for b in (2, 1, 0):  # backward: gather again (one block ahead), compute, reduce-scatter the gradients
        start = max(t, ready[b])
        if b > 0:
            s = max(comm_free, start)
            comm.append((s, gather, f"all-gather L{b - 1}", BLUE))
            comm_free = ready[b - 1] = s + gather
        compute.append((start, bwd, f"backward L{b}", ORANGE))
        t = start + bwd
        s = max(comm_free, t)
        comm.append((s, scatter, f"reduce-scatter L{b}", RED))
        comm_free = s + scatter
    fig, ax = plt.subplots(figsize=(12, 3.2))
    for y, items in ((1.2, comm), (0.0, compute)):
        for s, w, label, c in items:
            ax.add_patch(plt.Rectangle((s, y), w - 0.04, 0.8, fc=LIGHT[c], ec=c, lw=1.3))
            text = label.replace("all-gather ", "all-\ngather\n").replace("reduce-scatter ", "reduce-\nscatter\n")
            ax.text(s + w / 2, y + 0.4, text, ha="center", va="center", fontsize=7)
    end = max(s + w for s, w, _, _ in comm + compute)
    ax.set_xlim(-2.3, end + 0.2)
    ax.set_ylim(-0.2, 2.6)
    ax.text(-0.2, 1.6, "communication", ha="right", va="center", fontsize=9)
    ax.text(-0.2, 0.4, "compute", ha="right", va="center", fontsize=9)
    ax.axvline(forward_end + 0.15, color=GREY, ls="--", lw=1)
    ax.text(0, 2.3, "forward: gather a block's shards,\nrun it, free the full weights", fontsize=8.5, va="center")
    ax.text(forward_end + 0.5, 2.3, "backward: gather again, compute the gradients, reduce-scatter them "
            "(each rank keeps the sum of its shard)", fontsize=8.5, va="center")
    ax.set_axis_off()
    ax.set_title("FSDP (ZeRO-3) on one data-parallel rank, 3 blocks: one block's full weights at a time; "
                 "the next all-gather overlaps this block's compute", fontsize=9)
    return fig


# ---------------------------------------------------------------------------- 6. the TP x FSDP mesh


def mesh() -> plt.Figure:
    """8 GPUs as model parallel 2 x FSDP 4, and how a row-parallel weight (wo) is tiled over them."""
    mp, dp = 2, 4
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.1, 1]})
    colors = plt.cm.tab10.colors
    for ax in (left, right):
        ax.set_axis_off()
    left.set_xlim(-0.9, dp + 0.2)
    left.set_ylim(-0.9, mp + 0.9)
    for d in range(dp):
        for m in range(mp):
            rank = d * mp + m  # Fairscale: a model-parallel group is mp consecutive ranks
            left.add_patch(FancyBboxPatch((d + 0.08, mp - 1 - m + 0.1), 0.84, 0.8, boxstyle="round,pad=0.02",
                                          fc=colors[rank], ec="black", alpha=0.8))
            left.text(d + 0.5, mp - 1 - m + 0.5, f"GPU {rank}\nmp {m}, dp {d}", ha="center", va="center", fontsize=8,
                      color="white")
    left.text(dp / 2, mp + 0.45, "each column: one model-parallel group (mp ranks, same node, NVLink)",
              ha="center", fontsize=8)
    left.text(dp / 2, -0.45, "each row: one data-parallel (FSDP) group: the same shard of the model,\n"
              "different data; reduce-scatter / all-gather run along it", ha="center", fontsize=8)
    left.set_title(f"model parallel {mp} x FSDP {dp} = {mp * dp} GPUs", fontsize=10)
    dim = parallel.shard_dim("layers.0.attention.wo.weight")
    right.set_xlim(-0.6, mp * 2 + 0.4)
    right.set_ylim(-0.8, dp + 0.9)
    for m in range(mp):
        for d in range(dp):
            rank = d * mp + m
            right.add_patch(plt.Rectangle((m * 2, dp - 1 - d), 2, 1, fc=colors[rank], ec="white", lw=2, alpha=0.8))
            right.text(m * 2 + 1, dp - 0.5 - d, f"GPU {rank}", ha="center", va="center", fontsize=8, color="white")
    right.text(mp, dp + 0.45, f"wo (D, H*Dh): model parallel splits dim {dim} (input features, row-parallel),\n"
               "FSDP splits each rank's piece along dim 0 (output rows)", ha="center", fontsize=8)
    right.text(-0.35, dp / 2, "dim 0", rotation=90, va="center", fontsize=8)
    right.text(mp, -0.4, "dim 1", ha="center", fontsize=8)
    right.set_title("one weight, tiled over the mesh", fontsize=10)
    fig.tight_layout()
    return fig
