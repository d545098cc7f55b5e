"""What each subcommand does once its arguments are checked: load, score, print (rank 0), return
the numbers. compare.py builds on these, so its report shows the same numbers."""

import json
from pathlib import Path
from typing import List, Optional

from llama import parallel
from llama.common.dtypes import parse_dtype
from llama.common.files import write_text
from llama.eval import EvalError, datasets
from llama.eval.chat import chat_perplexity, is_chat_data, read_chats
from llama.eval.choice import read_items, score_items, write_per_item
from llama.eval.perplexity import conditional_perplexity, perplexity


def load(ckpt_dir: Optional[str], args, max_seq_len: int, lora: Optional[str] = None, max_batch_size: int = 1):
    """A Llama (model + tokenizer) for ckpt_dir, with a LoRA adapter merged in; SmolLM2-135M-Instruct
    when none is given. A LoRA run's out_dir as ckpt_dir finds its own base."""
    from llama.common import assets
    from llama.generation import Llama

    dtype = parse_dtype(args.dtype, "--dtype")
    return Llama.build(ckpt_dir or str(assets.smollm2_gguf()), args.tokenizer_path, max_seq_len=max_seq_len,
                       max_batch_size=max_batch_size, dtype=dtype, device=args.device, lora=lora)


def say(text: str = "") -> None:
    """Print on rank 0 only (under torchrun every rank runs the same evaluation)."""
    if parallel.is_first_rank():
        print(text, flush=True)


def input_paths(args) -> List[str]:
    """Every path the command reads: what an output may never be, contain or sit inside."""
    named = [getattr(args, k, None) for k in ("ckpt_dir", "lora", "tokenizer_path", "data", "choices", "prompts", "pairs", "ckpts")]
    return [p for v in named for p in (v if isinstance(v, list) else [v]) if p]  # compare: ckpts and --lora are lists


def check_inputs(args) -> None:
    """Read the data files now: a missing, binary or non-UTF-8 file fails before the weights load."""
    if args.command == "perplexity" and args.data not in datasets.PAIR_SETS:
        datasets.read_text(args.data, "--data")
    elif args.command == "choice":
        choice_items(args.data)


def score_text(llama, source: str, args, limit: Optional[int] = None) -> dict:
    """Perplexity of a text file or named set; humaneval scores solutions given their prompts, a chat
    jsonl the assistant replies given their dialogs (llama/eval/chat.py). `limit`: the first `limit`
    windows, pairs or dialogs only (compare --limit)."""
    model, tok, label = llama.model, llama.tokenizer, f"perplexity {Path(source).name}"
    if source in datasets.PAIR_SETS:
        res = conditional_perplexity(model, tok, datasets.humaneval_pairs()[:limit], args.batch_size, label)
    elif is_chat_data(source):
        res = chat_perplexity(model, tok, read_chats(source, limit), args.batch_size, label)
    else:
        text = datasets.read_text(source)
        if limit is not None:  # the first `limit` windows' worth of tokens
            text = tok.decode(tok.encode(text, bos=False, eos=False)[: args.max_length + (limit - 1) * args.stride])
        res = perplexity(model, tok, text, args.max_length, args.stride, args.batch_size, label)
    return {"data": source, **res.as_dict()}


def choice_items(source: str):
    return datasets.mmlu_smoke() if source in datasets.CHOICE_SETS else read_items(source)


def print_perplexity(r: dict) -> None:
    say(f"data          {r['data']} ({r['bytes']:,} bytes)")
    say(f"tokens scored {r['tokens']:,} (max_length {r['max_length']}, stride {r['stride']})")
    say(f"nats/token    {r['nats_per_token']:.4f}")
    say(f"perplexity    {r['perplexity']:.3f}")
    say(f"bits/byte     {r['bits_per_byte']:.4f}")
    say(f"speed         {r['tokens_per_s']:.0f} tokens/s ({r['seconds']:.1f} s)")


def perplexity_command(args) -> dict:
    llama = load(args.ckpt_dir, args, args.max_seq_len, args.lora)
    result = score_text(llama, args.data, args)
    print_perplexity(result)
    if args.json and parallel.is_first_rank():  # checked before loading (cli.check_args); atomic
        write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


def choice_command(args) -> dict:
    items = choice_items(args.data)
    llama = load(args.ckpt_dir, args, args.max_seq_len or 2048, args.lora)
    result = score_items(llama.model, llama.tokenizer, items, args.batch_size, args.separator, f"choice {args.data}")
    say(f"data      {args.data} ({result['items']} items)")
    say(f"acc       {result['acc']:.4f}")
    say(f"acc_norm  {result['acc_norm']:.4f}  (log-probability per character of the choice)")
    say(f"acc_bytes {result['acc_bytes']:.4f}  (log-probability per UTF-8 byte of the choice)")
    if args.out and parallel.is_first_rank():  # checked before loading (cli.check_args); atomic
        write_per_item(args.out, items, result)
        say(f"per-item  {args.out}")
    return result


def pairs_command(args) -> dict:
    from llama.eval import pairs as pair_eval

    items = pair_eval.read_pairs(args.data)  # a bad file fails before the weights load
    llama = load(args.ckpt_dir, args, args.max_seq_len or 1024, args.lora, max_batch_size=args.batch_size)
    result = pair_eval.score_pairs(llama, items, args.batch_size, args.max_gen_len)
    say(f"data          {args.data} ({result['pairs']} pairs)")
    say(f"pair acc      {result['pair_acc']:.4f}  (the chosen reply is the likelier one)")
    say(f"exact match   {result['exact_match']:.4f}  (the greedy reply is the chosen one)")
    if args.out:
        pair_eval.write_per_item(args.out, items, result)
        say(f"per-pair      {args.out}")
    return result


def check_file(path: Optional[str], what: str) -> None:
    if path and not Path(path).is_file():
        raise EvalError(f"{path}: no such file: pass an existing {what}")
