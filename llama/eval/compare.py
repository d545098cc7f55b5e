"""`compare A B [C ...]`: the command to run after a fine-tune. It answers two questions side by side:
what did the fine-tune gain on your data, and what did it lose in general?

Each model in turn (loaded, measured, freed): greedy replies to the same prompts, and scores on
- your data: `--data` (a text file, a named set, or a chat jsonl: its assistant replies given the
  dialog, in the model's chat format) and `--choices` (multiple choice);
- a general-ability check, on by default (`--no-general` skips it): the bundled prose
  (kjv-genesis, perplexity) and multiple-choice set (mmlu-smoke, accuracy) of llama/eval/datasets.py,
  text the fine-tune did not train on.
Then, into the folder `--out`, each file written atomically and an existing one replaced only with
--overwrite (llama/common/files.py; the folder's other files are never touched): report.md (the
scores, what changed against the first model, the replies), scores.png (the change of each score
against the first model: llama/eval/chart.py), scores.json (every number).

Chat: prompts go in each model's chat format (a user message, the reply) when `--chat`, or by
default when any compared model is a chat model (the rule: llama/eval/chat.py); `--no-chat` feeds
them as plain text to complete. The numbers come from the same functions as the single-model
commands, so they are equal.
"""

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from llama import parallel
from llama.checkpoint.peft import find_adapter
from llama.common.files import OutputError, check_output_file, read_text_file, write_text
from llama.eval import EvalError
from llama.eval.chart import gain_percent, verdict, write_chart
from llama.eval.chat import chat_reason, is_chat_data, read_chats, user_prompts
from llama.eval.choice import score_items
from llama.eval.commands import check_file, choice_items, load, say, score_text
from llama.eval.datasets import CHOICE_SETS, PAIR_SETS, TEXT_SETS, read_text
from llama.eval.pairs import read_pairs, score_pairs
from llama.eval.scoring import greedy_completions

DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
DEFAULT_CHAT_PROMPTS = ["What is the capital of France?", "Write a Python function that returns the n-th "
                        "Fibonacci number.", "Tell me a three-sentence story about a lighthouse."]
GENERAL = [("kjv-genesis", "perplexity", "general: English prose (KJV Genesis 1-5)"),
           ("mmlu-smoke", "accuracy", "general: multiple choice (MMLU exemplars)")]


@dataclass
class Measure:
    """One scored set: `kind` perplexity (lower is better) or accuracy (higher is better)."""
    key: str
    source: str
    kind: str
    title: str
    general: bool = False


@dataclass
class Model:
    ckpt: str
    lora: Optional[str]
    label: str


def measures_for(args) -> List[Measure]:
    out = []
    if args.data:
        out.append(Measure("data", args.data, "perplexity", f"your data: {Path(args.data).name}"))
    if args.choices:
        out.append(Measure("choices", args.choices, "accuracy", f"your data: {Path(args.choices).name}"))
    if getattr(args, "pairs", None):  # DPO's preference pairs (llama/eval/pairs.py): two shares of the same pairs
        name = Path(args.pairs).name
        out += [Measure("pairs", args.pairs, "accuracy", f"your pairs: {name}, chosen reply likelier"),
                Measure("pairs-exact", args.pairs, "accuracy", f"your pairs: {name}, greedy reply = chosen")]
    if args.general:
        out += [Measure(f"general-{kind}", source, kind, title, True) for source, kind, title in GENERAL
                if source not in (args.data, args.choices)]
    return out


def models_for(args) -> List[Model]:
    """The checkpoints, then each --lora adapter merged into the first one."""
    pairs = [(c, None) for c in args.ckpts] + [(args.ckpts[0], a) for a in args.lora or []]
    names = [short_name(c) + (f" + {short_name(a)}" if a else "") for c, a in pairs]
    return [Model(c, a, f"{n} ({i + 1})" if names.count(n) > 1 else n) for i, ((c, a), n) in enumerate(zip(pairs, names))]


def short_name(path: str) -> str:
    """smollm2 -> smollm2; out/mine/step_000030 -> mine/step_000030; a/model.gguf -> model.gguf."""
    p = Path(path.rstrip("/"))
    return f"{p.parent.name}/{p.name}" if p.name.startswith("step_") and p.parent.name else (p.name or path)


def read_prompts(args, chat: bool) -> List[str]:
    if args.prompts is None:
        if chat and args.data and is_chat_data(args.data):  # replies in the domain of your own chats
            return user_prompts(read_chats(args.data), 3) or DEFAULT_CHAT_PROMPTS
        return DEFAULT_CHAT_PROMPTS if chat else DEFAULT_PROMPTS
    check_file(args.prompts, "text file of prompts, one per line")
    prompts = [line.replace("\\n", "\n") for line in read_text_file(args.prompts, "--prompts").splitlines()
               if line.strip()]
    if not prompts:
        raise EvalError(f"{args.prompts}: the file is empty: write one prompt per line")
    return prompts


REPORT_FILES = ("report.md", "scores.png", "scores.json")


def check_outputs(out, overwrite: bool, inputs) -> None:
    """--out is a folder for REPORT_FILES; each follows the output-file rule (an existing
    one is replaced only with --overwrite; the folder's other files are never touched)."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise OutputError(f"--out {out} is a file, not a directory: name a folder for {', '.join(REPORT_FILES)}")
    for name in REPORT_FILES:
        check_output_file(Path(out) / name, overwrite, inputs, "--out")


def check_inputs(args) -> None:
    """Every check that needs no weights, before the first model loads (--out: check_outputs, by cli.check_args)."""
    if args.data and args.data not in TEXT_SETS + PAIR_SETS:
        read_text(args.data, "--data")  # a missing, empty, binary or non-UTF-8 file fails before any loading
    if args.choices and args.choices not in CHOICE_SETS:
        check_file(args.choices, "choice jsonl")
    if getattr(args, "pairs", None):
        read_pairs(args.pairs)  # a bad pair fails before any weights load
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit {args.limit}: score at least 1 item of each set (or leave it out: all)")
    for adapter in args.lora or []:
        find_adapter(adapter)


def evaluate_one(model: Model, prompts: List[str], measures: List[Measure], chat: bool, args) -> dict:
    llama = load(model.ckpt, args, args.max_seq_len, model.lora)
    row = {"label": model.label, "ckpt": model.ckpt, "lora": model.lora,
           "generations": greedy_completions(llama, prompts, args.max_gen_len, chat=chat, progress="replies"),
           "scores": {}}
    for m in measures:
        if m.kind == "perplexity":
            row["scores"][m.key] = score_text(llama, m.source, args, args.limit)
        elif m.key == "pairs":
            result = score_pairs(llama, read_pairs(m.source)[: args.limit], args.batch_size, args.max_gen_len)
            row["scores"]["pairs"] = {"data": m.source, "acc": result["pair_acc"], "items": result["pairs"]}
            row["scores"]["pairs-exact"] = {"data": m.source, "acc": result["exact_match"], "items": result["pairs"]}
        elif m.key != "pairs-exact":  # scored with "pairs"
            items = choice_items(m.source)[: args.limit]
            result = score_items(llama.model, llama.tokenizer, items, args.batch_size, progress=f"choice {m.source}")
            row["scores"][m.key] = {"data": m.source, **{k: v for k, v in result.items() if k != "per_item"}}
    del llama
    gc.collect()
    return row


def compare_command(args) -> List[dict]:
    check_inputs(args)
    models, measures = models_for(args), measures_for(args)
    reasons = {m.label: chat_reason(m.ckpt, m.lora) for m in models}
    chat = args.chat if args.chat is not None else any(reasons.values())
    prompts = read_prompts(args, chat)
    if args.choices:
        choice_items(args.choices)  # a bad line fails before any weights load
    rows = []
    for i, model in enumerate(models):
        say(f"[{i + 1}/{len(models)}] {model.label}: {len(prompts)} {'chat ' if chat else ''}prompts"
            + "".join(f", {m.key}" for m in measures))
        rows.append(evaluate_one(model, prompts, measures, chat, args))
    if parallel.is_first_rank():  # the outputs were checked before loading (cli.check_args); each is written atomically
        out = Path(args.out)
        chart = write_chart(rows, measures, out / "scores.png")
        write_text(out / "report.md", markdown_report(rows, measures, prompts, chat, reasons, chart is not None, args))
        write_text(out / "scores.json", json.dumps({"chat": chat, "prompts": prompts, "models": rows}, indent=2) + "\n")
        print_summary(rows, measures, prompts, out, chart is not None)
    return rows


# ---------------------------------------------------------------------------- what a person reads


def value(row: dict, m: Measure) -> float:
    s = row["scores"][m.key]
    return s["perplexity"] if m.kind == "perplexity" else s["acc"]


def size(row: dict, m: Measure) -> str:
    s = row["scores"][m.key]
    return f"{s['tokens']:,} tokens" if m.kind == "perplexity" else f"{s['items']:,} questions"


def change(base: float, new: float, m: Measure) -> str:
    """'perplexity 26.90 -> 13.70: better by 49.1%' or 'accuracy 31.9% -> 30.4%: worse by 4.7%' (the
    relative change of the score, as the chart draws it)."""
    values = f"{base:.2f} -> {new:.2f}" if m.kind == "perplexity" else f"{100 * base:.1f}% -> {100 * new:.1f}%"
    return f"{m.kind} {values}: {verdict(gain_percent(base, new, m.kind))}"


def markdown_report(rows, measures, prompts, chat, reasons, has_chart, args) -> str:
    lines = ["# Side-by-side evaluation", ""]
    for r in rows:
        why = reasons.get(r["label"])
        lines.append(f"- **{r['label']}**: `{r['ckpt']}`" + (f" + LoRA `{r['lora']}`" if r["lora"] else "")
                     + (f" (chat model: {why})" if why else " (not a chat model)"))
    how = "as chat (a user message in each model's chat format)" if chat else "plain text to complete"
    lines += ["", f"Prompts: {how}."]
    if measures:
        heads = []
        for m in measures:
            heads += [f"perplexity, {m.title}", f"bits/byte, {m.title}"] if m.kind == "perplexity" else [f"accuracy, {m.title}"]
        lines += ["", "## Scores", "", f"Perplexity: lower is better (windows of {args.max_length} tokens, stride "
                  f"{args.stride}; chats: each reply given its dialog); accuracy: higher is better."
                  + (f" At most {args.limit} windows, chats or questions per set (--limit)." if args.limit else ""),
                  "", "| model | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for r in rows:
            cells = []
            for m in measures:
                s = r["scores"][m.key]
                cells += [f"{s['perplexity']:.4f}", f"{s['bits_per_byte']:.4f}"] if m.kind == "perplexity" else [f"{s['acc']:.4f}"]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines += ["", "Set sizes: " + "; ".join(f"{m.title}: {size(rows[0], m)}" for m in measures) + "."]
    if measures and len(rows) > 1:
        lines += ["", f"## Against {rows[0]['label']}: gained and lost", ""]
        for r in rows[1:]:
            lines.append(f"**{r['label']}**")
            lines += [f"- {m.title}: {change(value(rows[0], m), value(r, m), m)}" for m in measures]
            lines.append("")
        if has_chart:
            lines += ["![change of each score against the first model](scores.png)"]
    lines += ["", f"## Greedy {'replies' if chat else 'continuations'} ({args.max_gen_len} tokens at most)", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"### Prompt {i + 1}", "", "```", prompt, "```", ""]
        for r in rows:
            lines += [f"**{r['label']}**", "", "```", r["generations"][i].replace("```", "'''"), "```", ""]
    return "\n".join(lines)


def print_summary(rows, measures, prompts, out: Path, has_chart: bool) -> None:
    import shutil

    width = min(shutil.get_terminal_size((100, 24)).columns, 120)
    for m in measures:
        say(f"{m.title} ({size(rows[0], m)})")
        for i, r in enumerate(rows):
            text = change(value(rows[0], m), value(r, m), m) if i else \
                (f"perplexity {value(r, m):.2f}" if m.kind == "perplexity" else f"accuracy {100 * value(r, m):.1f}%")
            say(f"  {r['label'][:30]:<30} {text}")
    for i, prompt in enumerate(prompts[:3]):
        say(f"\n{prompt.splitlines()[0][: width - 4]!s}")
        for r in rows:
            say(f"  {r['label'][:16]:<16} {' '.join(r['generations'][i].split())[: width - 20]}")
    say(f"\nreport: {out / 'report.md'}" + (f"   chart: {out / 'scores.png'}" if has_chart else ""))
