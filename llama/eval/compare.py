"""`compare A B [C ...]`: the command to run after a fine-tune. Each checkpoint in turn: greedy
generations for the same prompts, perplexity on a text, multiple-choice accuracy; then a Markdown
report (report.md), a bar chart (scores.png, matplotlib) and a one-screen summary in the terminal.
The numbers come from the same functions as the single-model commands, so they are equal."""

import gc
import shutil
from pathlib import Path
from typing import List


from llama import parallel
from llama.common.files import OutputError, atomic_write, check_output_file, read_text_file, write_text
from llama.eval import EvalError
from llama.eval.choice import score_items
from llama.eval.commands import check_file, choice_items, load, say, score_text
from llama.eval.datasets import CHOICE_SETS, PAIR_SETS, TEXT_SETS, read_text
from llama.eval.scoring import greedy_completions

DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
METRICS = [("perplexity", "perplexity", "lower is better"), ("bits_per_byte", "bits/byte", "lower is better"),
           ("acc", "accuracy", "higher is better"), ("acc_bytes", "accuracy (per byte)", "higher is better")]


def read_prompts(path) -> List[str]:
    if path is None:
        return DEFAULT_PROMPTS
    check_file(path, "text file of prompts, one per line")
    prompts = [line.replace("\\n", "\n") for line in read_text_file(path, "--prompts").splitlines() if line.strip()]
    if not prompts:
        raise EvalError(f"{path}: the file is empty: write one prompt per line")
    return prompts


REPORT_FILES = ("report.md", "scores.png")


def check_outputs(out, overwrite: bool, inputs) -> None:
    """--out is a folder for report.md and scores.png; each follows the output-file rule (an existing
    one is replaced only with --overwrite; the folder's other files are never touched)."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise OutputError(f"--out {out} is a file, not a directory: name a folder for {' and '.join(REPORT_FILES)}")
    for name in REPORT_FILES:
        check_output_file(Path(out) / name, overwrite, inputs, "--out")


def evaluate_one(ckpt: str, prompts: List[str], items, args) -> dict:
    llama = load(ckpt, args, args.max_seq_len)
    row = {"ckpt": ckpt, "generations": greedy_completions(llama, prompts, args.max_gen_len)}
    if args.data:
        row["perplexity"] = score_text(llama, args.data, args)
    if items is not None:
        result = score_items(llama.model, llama.tokenizer, items, args.batch_size)
        row["choice"] = {k: v for k, v in result.items() if k != "per_item"}
    del llama
    gc.collect()
    return row


def compare_command(args) -> List[dict]:
    prompts = read_prompts(args.prompts)
    if args.data and args.data not in TEXT_SETS + PAIR_SETS:
        read_text(args.data, "--data")  # a missing, empty, binary or non-UTF-8 file fails before any loading
    if args.choices and args.choices not in CHOICE_SETS:
        check_file(args.choices, "choice jsonl")
    items = choice_items(args.choices) if args.choices else None
    rows = [evaluate_one(ckpt, prompts, items, args) for ckpt in args.ckpts]
    if parallel.is_first_rank():  # the outputs were checked before loading (cli.check_args); each is written atomically
        out = Path(args.out)
        names = labels(args.ckpts)
        write_text(out / "report.md", markdown_report(names, prompts, rows, args))
        chart = write_chart(names, rows, out / "scores.png")
        print_summary(names, prompts, rows, out, chart)
    return rows


def labels(ckpts: List[str]) -> List[str]:
    """Short distinct names: the last path component, numbered when two agree."""
    names = [Path(c.rstrip("/")).name or c for c in ckpts]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def metric(row: dict, key: str):
    source = row.get("choice", {}) if key.startswith("acc") else row.get("perplexity", {})
    return source.get(key)


def markdown_report(names, prompts, rows, args) -> str:
    lines = ["# Side-by-side evaluation", ""]
    lines += [f"- **{n}**: `{r['ckpt']}`" for n, r in zip(names, rows)]
    used = [(k, title, note) for k, title, note in METRICS if metric(rows[0], k) is not None]
    if used:
        lines += ["", "## Scores", ""]
        if args.data:
            lines.append(f"Perplexity on `{args.data}` (max_length {args.max_length}, stride {args.stride}).")
        if args.choices:
            lines.append(f"Multiple choice on `{args.choices}` ({rows[0]['choice']['items']} items).")
        lines += ["", "| model | " + " | ".join(f"{t} ({n})" for _, t, n in used) + " |",
                  "|---|" + "---:|" * len(used)]
        lines += [f"| {n} | " + " | ".join(f"{metric(r, k):.4f}" for k, _, _ in used) + " |" for n, r in zip(names, rows)]
        lines += ["", "![scores](scores.png)"]
    lines += ["", f"## Greedy generations ({args.max_gen_len} tokens at most)", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"### Prompt {i + 1}", "", "```", prompt, "```", ""]
        for n, r in zip(names, rows):
            lines += [f"**{n}**", "", "```", r["generations"][i].replace("```", "'''"), "```", ""]
    return "\n".join(lines)


def write_chart(names, rows, path: Path):
    """One bar group per metric, one bar per model. None when there are no scores to draw."""
    used = [(k, t, n) for k, t, n in METRICS if metric(rows[0], k) is not None]
    if not used:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError("the chart needs matplotlib: pip install 'llama-ref[eval]' (or matplotlib)") from None
    fig, axes = plt.subplots(1, len(used), figsize=(3.2 * len(used), 3.4), squeeze=False)
    for ax, (key, title, note) in zip(axes[0], used):
        values = [metric(r, key) for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{title}\n({note})", fontsize=9)
        if key.startswith("acc"):
            ax.set_ylim(0, 1.1)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def print_summary(names, prompts, rows, out: Path, chart) -> None:
    width = min(shutil.get_terminal_size((100, 24)).columns, 120)
    used = [(k, t) for k, t, _ in METRICS if metric(rows[0], k) is not None]
    say(f"{'model':<24}" + "".join(f"{t:>20}" for _, t in used))
    for n, r in zip(names, rows):
        say(f"{n[:24]:<24}" + "".join(f"{metric(r, k):>20.4f}" for k, _ in used))
    for i, prompt in enumerate(prompts[:3]):
        say(f"\n{prompt.splitlines()[0][: width - 4]!s}")
        for n, r in zip(names, rows):
            text = " ".join(r["generations"][i].split())
            say(f"  {n[:16]:<16} {text[: width - 20]}")
    say(f"\nreport: {out / 'report.md'}" + (f"   chart: {chart}" if chart else ""))
