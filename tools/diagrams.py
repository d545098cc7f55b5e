"""The diagrams of docs/figures/, drawn by code so that they stay true to the code they picture.

    python tools/diagrams.py              # redraw every figure into docs/figures/
    python tools/diagrams.py --out DIR    # somewhere else (tests/test_publish.py compares the two)

The model's figures are here, the parallelism ones (tensor parallel, FSDP, the mesh) in
diagrams_parallel.py, the shared boxes and arrows in drawing.py. Shapes and numbers come from the
repository, not from memory: Llama 3.1 8B's shape from configs/models/llama3.1-8b.json, the RoPE
frequencies from llama/model.py, the split of each weight from llama/parallel SHARD_DIM. The PNGs carry no timestamp or version stamp, so the same matplotlib
draws the same bytes (manifest.json records which matplotlib drew them).
"""

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and the same renderer everywhere
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the llama package of this checkout
FIGURES = ROOT / "docs" / "figures"

from llama import model as M  # noqa: E402
from llama.common import files  # noqa: E402
from llama.plan import load_model_args  # noqa: E402
from tools.diagrams_parallel import fsdp_timeline, mesh, tensor_parallel  # noqa: E402
from tools.drawing import BLUE, GREEN, GREY, LIGHT, ORANGE, PURPLE, RED, arrow, box, canvas  # noqa: E402

# ---------------------------------------------------------------------------- 1. the block


def block(a) -> plt.Figure:
    """One Transformer block of Llama 3.1 8B with the shape of every tensor (B batch, T tokens)."""
    D, H, K, Dh, F = a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_hidden_dim
    fig, ax = canvas(8.6, 10.2, 10, 12)
    ax.text(5, 11.75, f"One Llama 3.1 8B block (x {a.n_layers}): D={D}, H={H} query heads, K={K} K/V heads, "
            f"Dh={Dh}, F={F}", ha="center", fontsize=10, weight="bold")
    cx = 5
    arrow(ax, (cx, 11.3), (cx, 10.75), text=f"x  (B, T, {D})")
    box(ax, cx - 1.3, 10.2, 2.6, 0.55, "attention_norm: RMSNorm", GREY)
    arrow(ax, (cx, 10.2), (cx, 9.85))
    for i, (name, out, color) in enumerate([("wq", H * Dh, BLUE), ("wk", K * Dh, GREEN), ("wv", K * Dh, GREEN)]):
        x = 1.5 + 2.6 * i
        box(ax, x, 9.2, 2.2, 0.6, f"{name}: {D} -> {out}", color)
        ax.plot([cx, x + 1.1], [9.85, 9.85], color="black", lw=1.2)
        arrow(ax, (x + 1.1, 9.85), (x + 1.1, 9.8))
    ax.text(0.1, 8.85, f"q (B, T, {H}, {Dh})", fontsize=8, color=BLUE)
    ax.text(4.05, 8.85, f"k (B, T, {K}, {Dh})", fontsize=8, color=GREEN)
    ax.text(6.7, 8.85, f"v (B, T, {K}, {Dh})", fontsize=8, color=GREEN)
    box(ax, 1.5, 8.05, 4.8, 0.5, "RoPE on q and k (position m: pair i turns by m*theta_i)", ORANGE, size=8)
    for x in (2.6, 5.2):
        arrow(ax, (x, 9.2), (x, 8.55))
    arrow(ax, (7.8, 9.2), (7.8, 7.6))
    box(ax, 1.5, 6.9, 7.2, 0.7, f"attention: softmax(q k^T / sqrt({Dh}) + causal mask) v\n"
        f"each K/V head serves {H // K} query heads (GQA)", PURPLE, size=8.5)
    for x in (2.6, 5.2):
        arrow(ax, (x, 8.05), (x, 7.6))
    arrow(ax, (cx, 6.9), (cx, 6.55), text=f"(B, T, {H}*{Dh})")
    box(ax, cx - 1.3, 6.0, 2.6, 0.55, f"wo: {H * Dh} -> {D}", BLUE)
    circle_y = 5.45
    arrow(ax, (cx, 6.0), (cx, circle_y + 0.18))
    ax.text(cx, circle_y, "+", ha="center", va="center", fontsize=14, weight="bold")
    ax.plot([cx, 9.4, 9.4, cx + 0.2], [11.05, 11.05, circle_y, circle_y], color=GREY, lw=1.2)
    ax.text(9.5, 8.3, "residual", rotation=90, fontsize=8, color=GREY, va="center")
    arrow(ax, (cx, circle_y - 0.18), (cx, 4.85), text=f"h  (B, T, {D})")
    box(ax, cx - 1.3, 4.3, 2.6, 0.55, "ffn_norm: RMSNorm", GREY)
    arrow(ax, (cx, 4.3), (cx, 3.95))
    ax.plot([2.6, 7.4], [3.95, 3.95], color="black", lw=1.2)
    box(ax, 1.5, 3.2, 2.2, 0.6, f"w1: {D} -> {F}", RED)
    box(ax, 6.3, 3.2, 2.2, 0.6, f"w3: {D} -> {F}", RED)
    for x in (2.6, 7.4):
        arrow(ax, (x, 3.95), (x, 3.8))
    box(ax, 1.5, 2.35, 2.2, 0.5, "SiLU (the gate)", ORANGE, size=8)
    arrow(ax, (2.6, 3.2), (2.6, 2.85))
    ax.text(cx, 2.15, "\u2299", ha="center", va="center", fontsize=14, weight="bold")  # elementwise product
    arrow(ax, (3.7, 2.6), (cx - 0.2, 2.2))
    arrow(ax, (7.4, 3.2), (cx + 0.2, 2.25))
    arrow(ax, (cx, 1.95), (cx, 1.65), text=f"(B, T, {F})")
    box(ax, cx - 1.3, 1.1, 2.6, 0.55, f"w2: {F} -> {D}", RED)
    arrow(ax, (cx, 1.1), (cx, 0.78))
    ax.text(cx, 0.6, "+", ha="center", va="center", fontsize=14, weight="bold")
    ax.plot([cx, 9.0, 9.0, cx + 0.2], [4.95, 4.95, 0.6, 0.6], color=GREY, lw=1.2)
    ax.text(cx + 0.4, 0.15, f"out  (B, T, {D}): the next block's x", fontsize=8)
    return fig


# ---------------------------------------------------------------------------- 2. GQA


def gqa(a) -> plt.Figure:
    """Multi-head, grouped-query and multi-query attention: which K/V head each query head reads."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    n_q = 8
    for ax, (title, n_kv) in zip(axes, [("multi-head: 8 K/V heads", 8), ("grouped-query: 2 K/V heads", 2),
                                        ("multi-query: 1 K/V head", 1)]):
        ax.set_xlim(-0.5, n_q - 0.5)
        ax.set_ylim(-0.4, 2.6)
        ax.set_axis_off()
        ax.set_title(title, fontsize=10)
        colors = plt.cm.tab10.colors
        group = n_q // n_kv
        for h in range(n_q):
            kv = h // group
            ax.add_patch(FancyBboxPatch((h - 0.35, 1.8), 0.7, 0.5, boxstyle="round,pad=0.02", fc=colors[kv], ec="black",
                                        alpha=0.85))
            ax.text(h, 2.05, f"q{h}", ha="center", va="center", fontsize=8, color="white")
            centre = (kv + 0.5) * group - 0.5
            ax.plot([h, centre], [1.8, 0.75], color=colors[kv], lw=1.2)
        for kv in range(n_kv):
            centre = (kv + 0.5) * group - 0.5
            width = max(0.7, group - 0.3)
            ax.add_patch(FancyBboxPatch((centre - width / 2, 0.25), width, 0.5, boxstyle="round,pad=0.02",
                                        fc=LIGHT[GREY], ec=colors[kv], lw=2))
            ax.text(centre, 0.5, f"k{kv}, v{kv}", ha="center", va="center", fontsize=8)
        ax.text(3.5, -0.25, f"cache per token per layer: {2 * n_kv} vectors", ha="center", fontsize=8)
    fig.suptitle(f"8 query heads and their K/V heads. Llama 3.1 uses GQA at every size: {a.n_heads} query heads, "
                 f"{a.n_kv_heads} K/V heads in 8B ({a.n_heads // a.n_kv_heads} per group)", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- 3. the KV cache


def kv_cache() -> plt.Figure:
    """Which cache slots hold keys/values after prefill and each decode step."""
    prompt, steps, slots = 5, 4, 10
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.set_xlim(-3.4, slots + 0.2)
    ax.set_ylim(-1.0, steps + 1.6)
    ax.set_axis_off()
    rows = [("prefill", 0, prompt)] + [(f"decode {i + 1}", prompt + i, prompt + i + 1) for i in range(steps)]
    for r, (label, start, end) in enumerate(rows):
        y = steps - r
        ax.text(-0.3, y + 0.4, f"{label}: start_pos={start}, T={end - start}", ha="right", va="center", fontsize=8.5)
        for s in range(slots):
            if s < start:
                fc, ec = LIGHT[BLUE], BLUE  # cached earlier: read, not recomputed
            elif s < end:
                fc, ec = ORANGE, ORANGE  # written by this call
            else:
                fc, ec = "white", GREY  # allocated, not yet used (masked out)
            ax.add_patch(plt.Rectangle((s, y), 0.9, 0.8, fc=fc, ec=ec, lw=1))
    for s in range(slots):
        ax.text(s + 0.45, steps + 1.0, str(s), ha="center", fontsize=8)
    ax.text(slots / 2, steps + 1.35, "cache slots (positions), sized to the request: prompt + max_gen_len", ha="center",
            fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, fc=ORANGE, ec=ORANGE), plt.Rectangle((0, 0), 1, 1, fc=LIGHT[BLUE], ec=BLUE),
               plt.Rectangle((0, 0), 1, 1, fc="white", ec=GREY)]
    ax.legend(handles, ["K, V computed and written by this call", "read from the cache (attended to)",
                        "empty: not attended to"], loc="lower center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8,
              frameon=False)
    ax.set_title("The KV cache: one prefill call writes the prompt's 5 positions, each decode step writes one more "
                 "and reads all before it", fontsize=9.5)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- 7. LoRA


def lora() -> plt.Figure:
    """y = W x + (alpha / r) B A x, with W frozen and B zero at the start."""
    fig, ax = canvas(9, 4.4, 10, 5)
    ax.set_title("LoRA: a frozen weight plus a trained low-rank update", fontsize=10)
    box(ax, 0.2, 2.1, 1.2, 0.8, "x\n(.., d_in)", GREY, size=8.5)
    box(ax, 2.6, 3.3, 3.0, 1.0, "W  (d_out, d_in)\nfrozen (no gradient,\nno AdamW state)", BLUE, size=8.5)
    box(ax, 2.6, 0.5, 1.3, 1.1, "A  (r, d_in)\nrandom\ntrained", GREEN, size=8)
    box(ax, 4.3, 0.5, 1.3, 1.1, "B  (d_out, r)\nzeros at start\ntrained", ORANGE, size=8)
    box(ax, 6.2, 0.65, 1.1, 0.8, "\u00d7 alpha / r", PURPLE, size=8.5)
    ax.text(8.0, 2.5, "+", ha="center", va="center", fontsize=18, weight="bold")
    box(ax, 8.6, 2.1, 1.2, 0.8, "y\n(.., d_out)", GREY, size=8.5)
    arrow(ax, (1.4, 2.5), (2.6, 3.8))
    arrow(ax, (1.4, 2.5), (2.6, 1.05))
    arrow(ax, (3.9, 1.05), (4.3, 1.05), text="r", size=8, offset=(-0.1, 0.15))
    arrow(ax, (5.6, 1.05), (6.2, 1.05))
    arrow(ax, (5.6, 3.8), (7.8, 2.65))
    arrow(ax, (7.3, 1.05), (7.8, 2.35))
    arrow(ax, (8.2, 2.5), (8.6, 2.5))
    ax.text(4.1, 2.45, "B = 0: the first forward is exactly the base model's;\nthe update B A has rank <= r "
            "(8 or 16)\nand r (d_in + d_out) weights", ha="center", fontsize=8, style="italic")
    return fig


# ---------------------------------------------------------------------------- 8. RoPE on the unit circle


def rope_circle(a) -> plt.Figure:
    """The angle m * theta_i a pair reaches by position m: a fast pair, one that turns many times within
    the 8K pre-training context, and a slow one that Llama 3.1's scaling slows down 8x."""
    plain = M.rope_frequencies(M.ModelArgs(**{**a.__dict__, "use_scaled_rope": False})).double()
    scaled = M.rope_frequencies(a).double()
    original = a.rope_original_max_seq_len
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.6))
    circle = [k / 200 * 2 * math.pi for k in range(201)]
    for ax in axes:
        ax.plot([math.cos(x) for x in circle], [math.sin(x) for x in circle], color=GREY, lw=0.8)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_xlim(-1.3, 1.3)
        ax.set_ylim(-1.3, 1.3)
    ax = axes[0]  # pair 0 turns by one radian per token
    for m in range(8):
        angle = m * plain[0].item()
        ax.plot([0, math.cos(angle)], [0, math.sin(angle)], color=BLUE, lw=1.2, alpha=0.35 + 0.09 * m)
        ax.text(1.15 * math.cos(angle), 1.15 * math.sin(angle), str(m), fontsize=8, ha="center", va="center")
    ax.set_title("pair 0: theta = 1 radian per token\n(wavelength 6.3 tokens); positions 0-7", fontsize=9)
    wavelength = 2 * math.pi / plain
    low_edge = original / a.rope_low_freq_factor
    for ax, i in zip(axes[1:], [20, int((wavelength > low_edge).nonzero()[0]) + 5]):
        lam = wavelength[i].item()
        band = "kept" if lam < original / a.rope_high_freq_factor else ("slowed 8x" if lam > low_edge else "blended")
        row = 0
        for reach, color, radius, label in [(original * plain[i].item(), BLUE, 1.0, f"{original // 1024}K positions "
                                             "(pre-training)"),
                                            (131072 * plain[i].item(), RED, 0.78, "128K, unscaled"),
                                            (131072 * scaled[i].item(), GREEN, 0.56, "128K, Llama 3.1 scaling")]:
            sweep = min(reach, 2 * math.pi)
            xs = [k / 100 * sweep for k in range(101)]
            ax.plot([radius * math.cos(x) for x in xs], [radius * math.sin(x) for x in xs], color=color, lw=4,
                    solid_capstyle="butt")
            ax.text(0, -1.35 - 0.17 * row, f"{label}: {reach / (2 * math.pi):,.2f} turns", ha="center", va="top",
                    fontsize=7.5, color=color)
            row += 1
        ax.set_title(f"pair {i}: wavelength {lam:,.0f} tokens ({band})", fontsize=9)
    fig.text(0.5, -0.02, "A fast pair has turned through every angle many times within 8K tokens. A slow pair has not: "
             "unscaled, 128K positions reach angles pre-training never showed;\nLlama 3.1's scaling divides its "
             "frequency by 8, so 128K stays within 2x of the range seen (and long-context training covers the rest).",
             ha="center", va="top", fontsize=8)
    fig.suptitle("RoPE turns pair i of a query or key by m * theta_i at position m (Llama 3.1 8B, base 500,000; "
                 "arcs: the angles reached)", fontsize=10)
    return fig


def draw_all(out: Path) -> list:
    """Draw every figure into `out`, with manifest.json (the matplotlib that drew them and each file's
    sha256: tests/test_publish.py checks both); returns the PNGs written."""
    out.mkdir(parents=True, exist_ok=True)
    a = load_model_args("llama3.1-8b")
    figures = {"block.png": lambda: block(a), "gqa.png": lambda: gqa(a), "kv_cache.png": kv_cache,
               "tensor_parallel.png": tensor_parallel, "fsdp_timeline.png": fsdp_timeline, "mesh.png": mesh,
               "lora.png": lora, "rope_circle.png": lambda: rope_circle(a)}
    written = []
    for name, draw in figures.items():
        with plt.rc_context({"svg.hashsalt": "llama-ref", "font.family": "DejaVu Sans"}):
            fig = draw()
            files.atomic_write(out / name, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight",
                                                                 pad_inches=0.1, metadata={"Software": None}))
            plt.close(fig)
        written.append(out / name)
    manifest = {"matplotlib": matplotlib.__version__,
                "figures": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in written}}
    files.write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(FIGURES), help="directory for the PNGs (default docs/figures)")
    args = parser.parse_args(argv)
    for path in draw_all(Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
