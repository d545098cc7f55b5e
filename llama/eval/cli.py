"""`python -m llama.eval perplexity|choice|compare|harness`: the command lines (see docs/evaluation.md).

    python -m llama.eval perplexity                              # SmolLM2 on Genesis 1-5 (KJV)
    python -m llama.eval perplexity --ckpt-dir out/ --data notes.txt --max-length 1024 --stride 512
    python -m llama.eval perplexity --data humaneval             # canonical solutions given prompts
    python -m llama.eval choice --data items.jsonl --out scored.jsonl
    python -m llama.eval pairs --data heldout.jsonl --ckpt-dir out/dpo   # preference pairs: accuracy, exact match
    python -m llama.eval compare smollm2 out/mine --data held_out_chats.jsonl   # a fine-tune against its base
    python -m llama.eval harness --model llama-ref --model_args ckpt_dir=... --tasks ...
    torchrun --nproc_per_node 2 -m llama.eval perplexity --ckpt-dir ...   # model parallel; rank 0 prints

Bad input ends the program with one line on stderr ("error: ...") and exit status 1.
"""

import argparse
import sys

from llama.common.checks import check_device, check_number
from llama.common.dtypes import DTYPES
from llama.common.errors import USER_ERRORS, report
from llama.common.files import add_output_argument, check_output_file
from llama.eval import commands, compare
from llama.eval.perplexity import check_window


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer-path", help="default: the tokenizer found beside the weights")
    p.add_argument("--max-seq-len", type=int, help="the model's context (default: what the command needs)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences scored per forward pass")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's (fp32 for GGUF)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")


def _window_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-length", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: max-length / 2)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama.eval", description="Measure a Llama checkpoint.")
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("perplexity", help="strided-window perplexity of a text")
    ppl.add_argument("--ckpt-dir", help="Meta dir, HF dir, .gguf or training out_dir (default: SmolLM2-135M)")
    ppl.add_argument("--lora", help="a LoRA adapter (PEFT dir or LoRA run) merged into --ckpt-dir, as generate.py --lora")
    ppl.add_argument("--data", default="kjv-genesis", help="a text file, a chat jsonl (its assistant replies), "
                     "or kjv-genesis (default), kjv-genesis-full, humaneval")
    _window_flags(ppl)
    _model_flags(ppl)
    add_output_argument(ppl, "--json", kind="file", help="also write the result to this JSON file")
    ppl.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    ch = sub.add_parser("choice", help="multiple choice by loglikelihood on a jsonl")
    ch.add_argument("--ckpt-dir", help="as for perplexity")
    ch.add_argument("--lora", help="as for perplexity")
    ch.add_argument("--data", default="mmlu-smoke", help='jsonl of {"context", "choices", "label"}, or mmlu-smoke')
    add_output_argument(ch, "--out", kind="file", help="write per-item scores (jsonl) here")
    ch.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ch.add_argument("--separator", default=" ", help="between context and choice (default: a space)")
    _model_flags(ch)
    pr = sub.add_parser("pairs", help="preference pairs (DPO's jsonl): pair accuracy and greedy exact match")
    pr.add_argument("--data", required=True, help='jsonl of {"prompt" or "messages", "chosen", "rejected"}')
    pr.add_argument("--ckpt-dir", help="as for perplexity")
    pr.add_argument("--lora", help="as for perplexity")
    pr.add_argument("--max-gen-len", type=int, default=32, help="tokens of each greedy reply at most")
    add_output_argument(pr, "--out", kind="file", help="write per-pair scores and replies (jsonl) here")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _model_flags(pr)
    cmp_ = sub.add_parser("compare", help="several checkpoints side by side: what a fine-tune gained and lost "
                          "(report.md, scores.png, scores.json)")
    cmp_.add_argument("ckpts", nargs="+", metavar="CKPT", help="checkpoints to compare, the first one the base: "
                      "smollm2, a Meta/HF dir, a .gguf, a training out_dir or step dir (LoRA runs find their base)")
    cmp_.add_argument("--lora", action="append", metavar="ADAPTER", help="also compare the first CKPT with this "
                      "adapter merged (PEFT dir or LoRA training checkpoint; repeatable)")
    cmp_.add_argument("--prompts", help="text file, one prompt per line (default: the first user messages of a chat "
                      "--data, else a few built-in prompts)")
    cmp_.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                      help="prompts as a user message in each model's chat format (default: when any model is a "
                      "chat model, see docs/evaluation.md); --no-chat: plain text to complete")
    cmp_.add_argument("--data", help="your data: a text file, a chat jsonl ({\"messages\": ...} per line: the "
                      "assistant replies are scored) or a named set, for perplexity")
    cmp_.add_argument("--choices", help="your multiple-choice jsonl (or mmlu-smoke), for accuracy")
    cmp_.add_argument("--general", action=argparse.BooleanOptionalAction, default=True,
                      help="the general-ability check: kjv-genesis perplexity and mmlu-smoke accuracy")
    cmp_.add_argument("--limit", type=int, help="score at most this many windows, chats or questions of each set")
    cmp_.add_argument("--pairs", help="preference pairs jsonl: pair accuracy and greedy exact match (llama/eval/pairs.py)")
    cmp_.add_argument("--max-gen-len", type=int, default=48)
    add_output_argument(cmp_, "--out", kind="dir", default="eval_report",
                        help="folder for report.md, scores.png and scores.json")
    cmp_.add_argument("--overwrite", action="store_true", help="replace report.md, scores.png and scores.json in --out")
    _window_flags(cmp_)
    _model_flags(cmp_)
    sub.add_parser("harness", help="lm-evaluation-harness with the llama-ref model (all further arguments go "
                   "to lm_eval)", add_help=False)
    return p


def check_args(args) -> None:
    """Fail fast, before loading any weights: numbers, the device, every input file readable, every
    output allowed (llama/common/files.py: never an input, an existing file only with --overwrite)."""
    if getattr(args, "stride", None) is None and hasattr(args, "max_length"):
        args.stride = max(1, args.max_length // 2)
    if args.max_seq_len is not None:
        check_number("--max-seq-len", args.max_seq_len, low=2, integer=True, fix="the model's context in tokens")
    if hasattr(args, "max_length"):
        if args.max_seq_len is None:
            args.max_seq_len = args.max_length
        check_window(args.max_length, args.stride, args.max_seq_len)
    check_number("--batch-size", args.batch_size, low=1, integer=True, fix="sequences per forward pass, e.g. 8")
    if hasattr(args, "max_gen_len"):
        check_number("--max-gen-len", args.max_gen_len, low=1, integer=True, fix="tokens per greedy generation")
    check_device(args.device, "--device")
    inputs = commands.input_paths(args)
    if args.command == "perplexity" and args.json is not None:
        check_output_file(args.json, args.overwrite, inputs, "--json")
    elif args.command in ("choice", "pairs") and args.out is not None:
        check_output_file(args.out, args.overwrite, inputs, "--out")
    elif args.command == "compare":
        compare.check_outputs(args.out, args.overwrite, inputs)
    commands.check_inputs(args)


COMMANDS = {"perplexity": commands.perplexity_command, "choice": commands.choice_command,
            "pairs": commands.pairs_command,
            "compare": compare.compare_command}


def run(args) -> dict:
    check_args(args)
    return COMMANDS[args.command](args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["harness"]:
        from llama.eval.lm_eval_adapter import harness_main

        return harness_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as e:  # bad input or a missing path: one line; anything else is a bug's traceback
        return report(e)
    return 0
