"""The command line behind generate.py: arguments, streaming output, --show-probs, the chat REPL.

    python generate.py                                  # SmolLM2-135M-Instruct, two demo prompts
    python generate.py --ckpt-dir Meta-Llama-3.1-8B/ --prompt "..." --prompt "..."
    python generate.py --chat --system "Answer briefly."
    torchrun --nproc_per_node 2 generate.py --ckpt-dir ...   # model parallel; rank 0 prints

Bad input ends the program with one line on stderr ("error: ...") and exit status 1.
"""

import argparse
import json
import sys
from typing import Callable, List, Optional

import torch

from llama import parallel
from llama.common.dtypes import DTYPES, parse_dtype
from llama.common.checks import check_device, check_seed
from llama.common.errors import USER_ERRORS, ArgumentError, UserError, report as report_error
from llama.common.files import read_text_file
from llama.generation.quantize import check_quantize
from llama.generation.sampling import check_sampling_args
from llama.common.threads import POLICY_HELP, set_torch_threads
from llama.tokenizer.tools import tool_definitions

DEMO_PROMPTS = ["I believe the meaning of life is", "Simply put, the theory of relativity states that"]


def add_model_arguments(p: argparse.ArgumentParser, batch_help: str = "None: the number of prompts") -> None:
    """The flags that build a Llama: generate.py and the server (python -m llama.serve) share them."""
    p.add_argument("--ckpt-dir", help="Meta dir, HF dir or .gguf file (None: SmolLM2-135M-Instruct, fetched once)")
    p.add_argument("--tokenizer-path", help="None: the tokenizer found beside the weights")
    p.add_argument("--max-seq-len", type=int, default=2048, help="prompt + generation, in tokens")
    p.add_argument("--max-batch-size", type=int, help=batch_help)
    p.add_argument("--seed", type=int, default=1, help="sampling seed (the same on every rank)")
    p.add_argument("--dtype", choices=list(DTYPES), metavar="{bf16,fp16,fp32,bfloat16,float16,float32}",
                   help="None: the checkpoint's (fp32 for GGUF)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (None: cuda if available, else cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: ~2x faster decoding on CPU after minutes of compiling")
    p.add_argument("--quantize", help="weight-only int8 or int4 (None: off)")
    p.add_argument("--group-size", type=int, help="weights per scale, 32-256 (int8 also 0: one per row; "
                   "None: 64 for int8, 32 for int4)")
    p.add_argument("--lora", metavar="ADAPTER", help="merge a LoRA adapter (PEFT dir or LoRA training checkpoint) at load")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description="Sample text from a Llama checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # every default shown
                                epilog=POLICY_HELP)
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", help="a prompt to complete (repeat for a batch; None: two demo "
                   "prompts); not with --chat")
    p.add_argument("--chat", action="store_true", help="interactive chat in the model's chat format")
    p.add_argument("--system", help="system message (needs --chat)")
    p.add_argument("--tools", action="append", metavar="TOOLS",
                   help="tools the chat's model may call (Llama 3.1; needs --chat): built-in names, comma-separated "
                   "(brave_search,wolfram_alpha,code_interpreter), or a .json file of tool definitions; repeatable")
    p.add_argument("--today", help="the 'Today Date' of Llama 3.1's system block, e.g. '21 September 2024' "
                   "(needs --chat)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1 disables it)")
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--max-gen-len", type=int, default=128, help="new tokens per prompt at most")
    p.add_argument("--show-probs", type=int, nargs="?", const=5, default=0, metavar="N",
                   help="print each token with its N likeliest alternatives (default N: 5)")
    p.add_argument("--truncate", action="store_true", help="keep the end of prompts longer than the context")
    return p


def check_model_args(args) -> None:
    """The shared model flags (add_model_arguments), checked before any weights load."""
    check_quantize(args.quantize, args.group_size)
    if args.max_seq_len < 2:
        raise ArgumentError(f"--max-seq-len {args.max_seq_len}: need room for a prompt and a new token")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise ArgumentError(f"--max-batch-size {args.max_batch_size}: must be at least 1")
    check_seed("--seed", args.seed)
    check_device(args.device, "--device")


def check_args(args) -> None:
    """Fail fast, before loading any weights (ArgumentError: one line naming the flag and the fix)."""
    check_sampling_args(args.temperature, args.top_p, args.top_k)
    check_model_args(args)
    if args.max_gen_len < 1:
        raise ArgumentError(f"--max-gen-len {args.max_gen_len}: generate at least 1 token")
    for i, prompt in enumerate(args.prompt or []):
        if not prompt.strip():
            raise ArgumentError(f"--prompt number {i + 1} is empty: give some text to complete")
    if args.show_probs < 0:
        raise ArgumentError(f"--show-probs {args.show_probs}: give how many alternatives to show, e.g. 5 (0: off)")
    if args.chat and args.prompt:
        raise ArgumentError("--prompt does nothing with --chat (the chat reads its messages from stdin): "
                            "drop one of them")
    for flag in ("system", "tools", "today"):
        if getattr(args, flag) is not None and not args.chat:
            raise ArgumentError(f"--{flag} is for the chat: add --chat (or drop --{flag})")
    args.tools = read_tools(args.tools)


def read_tools(specs: Optional[List[str]]) -> Optional[list]:
    """--tools values -> a tools list: built-in names (comma-separated) or .json files of definitions."""
    if not specs:
        return None
    tools: list = []
    for spec in specs:
        if spec.endswith(".json"):
            try:
                loaded = json.loads(read_text_file(spec, "--tools"))  # a binary or non-UTF-8 file: one line
            except json.JSONDecodeError as e:
                raise ArgumentError(f"--tools {spec}: not JSON ({e.msg}, line {e.lineno})") from None
            tools.extend(loaded if isinstance(loaded, list) else [loaded])
        else:
            tools.extend(name.strip() for name in spec.split(",") if name.strip())
    tool_definitions(tools)  # bad definitions fail here, before any weights load
    return tools


class Printer:
    """Writes only on rank 0 (under torchrun every rank runs the same loop)."""

    def __init__(self, out=None, err=None):
        self.out, self.err = out or sys.stdout, err or sys.stderr

    def __call__(self, text: str = "", end: str = "\n", err: bool = False) -> None:
        if parallel.is_first_rank():
            stream = self.err if err else self.out
            stream.write(text + end)
            stream.flush()


def format_probs(tokenizer, token, top) -> str:
    """One --show-probs line: the chosen token, its probability, and the alternatives."""
    prob = dict(top).get(token.id)
    chosen = f"{tokenizer.decode([token.id])!r:>16} {prob:6.3f}" if prob is not None else \
        f"{tokenizer.decode([token.id])!r:>16}  <top>"
    alts = "  ".join(f"{tokenizer.decode([i])!r} {p:.3f}" for i, p in top if i != token.id)
    return f"{chosen}  | {alts}"


def stream_batch(llama, prompt_tokens: List[List[int]], headers: List[str], args, say: Printer,
                 hide_tagged: bool = False) -> List[dict]:
    """Generate a batch; print sequence 0 live, then each next sequence (buffered meanwhile) as
    soon as the one before it is done, each after its header. Returns each sequence's reply:
    {"text", "ids" (without the stop token), "stop" (the stop token, None at the length limit)}.
    hide_tagged: print nothing of a reply that opens with <|python_tag|> (a tool call, shown by the caller)."""
    replies = [{"text": "", "ids": [], "stop": None} for _ in prompt_tokens]
    buffered = [[headers[b]] for b in range(len(prompt_tokens))]
    finished = [False] * len(prompt_tokens)
    tag = getattr(llama.tokenizer, "special_tokens", {}).get("<|python_tag|>") if hide_tagged else None
    current = 0
    for seq, text, tok in llama.stream(prompt_tokens, args.max_gen_len, temperature=args.temperature,
                                       top_p=args.top_p, top_k=args.top_k, top_n=args.show_probs):
        reply = replies[seq]
        reply["text"] += text
        if tok.id in llama.stop_tokens:
            reply["stop"] = tok.id
        else:
            reply["ids"].append(tok.id)
        hidden = tag is not None and reply["ids"][:1] == [tag]
        buffered[seq].append("" if hidden else format_probs(llama.tokenizer, tok, tok.top) + "\n"
                             if args.show_probs else text)
        finished[seq] = tok.done
        while current < len(prompt_tokens):  # flush what can be shown, in prompt order
            say("".join(buffered[current]), end="")
            buffered[current] = []
            if not finished[current]:
                break
            if not (tag is not None and replies[current]["ids"][:1] == [tag]):
                say()
            current += 1
    return replies


def run_prompts(llama, prompts: List[str], args, say: Printer) -> list:
    prompt_tokens = [llama.encode_prompt(p) for p in prompts]
    if args.truncate:
        prompt_tokens = llama.truncate_prompts(prompt_tokens, args.max_gen_len)
    llama.check_request(prompt_tokens, args.max_gen_len)
    newline = "\n" if args.show_probs else ""
    headers = [("" if i == 0 else "\n") + (f"[{i + 1}] " if len(prompts) > 1 else "") + p + newline
               for i, p in enumerate(prompts)]
    stream_batch(llama, prompt_tokens, headers, args, say)
    return [llama.stats]


def read_line(prompt: str, say: Printer) -> Optional[str]:
    """Rank 0 reads a line from stdin and shares it with every rank; None at end of input."""
    line = None
    if parallel.is_first_rank():
        say(prompt, end="")
        line = sys.stdin.readline()
        line = line.rstrip("\n") if line else None
    if torch.distributed.is_initialized():
        box = [line]
        torch.distributed.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def paste_tool_result(call: dict, say: Printer) -> Optional[str]:
    """The chat's tool executor: it never runs anything, it asks you to paste the tool's output. To run
    tools, pass chat() your own `run_tool(call) -> str` (call: OpenAI's {"id", "type": "function",
    "function": {"name", "arguments": JSON}}); never execute model-written code unsandboxed."""
    say("paste the tool's result; an empty line ends it (Ctrl-D: skip the call)", err=True)
    lines = []
    while (line := read_line("result> ", say)) is not None and line != "":
        lines.append(line)
    return "\n".join(lines) if line is not None else None


def chat(llama, args, say: Printer, run_tool: Optional[Callable[[dict], Optional[str]]] = None) -> list:
    """A REPL: each turn appends to the dialog, so the model sees the whole conversation.
    '/reset' starts over; end of input (Ctrl-D) quits. Oldest turns are dropped when the dialog
    no longer fits in max_seq_len. With --tools, a reply that calls a tool is shown as one and
    `run_tool` (default: paste_tool_result) gives its result, which goes back to the model."""
    run_tool = run_tool or (lambda call: paste_tool_result(call, say))
    system = [{"role": "system", "content": args.system}] if args.system else []
    tools = getattr(args, "tools", None)
    tool_args = dict(tools=tools, today=getattr(args, "today", None)) if tools or getattr(args, "today", None) else {}
    dialog, stats = list(system), []
    say("chat: type a message; /reset clears the history; Ctrl-D quits", err=True)
    while (line := read_line("> ", say)) is not None:
        if line.strip() == "/reset":
            dialog = list(system)
            continue
        if not line.strip():
            continue
        dialog.append({"role": "user", "content": line})
        while True:  # the model's replies until one is not a tool call
            tokens = llama.encode_dialog(dialog, **tool_args)
            while len(tokens) >= args.max_seq_len and len(dialog) > len(system) + 1:
                dialog = system + dialog[len(system) + 2:]  # forget the oldest exchange
                tokens = llama.encode_dialog(dialog, **tool_args)
            try:
                llama.check_request([tokens], args.max_gen_len)
            except UserError as e:  # this message alone is too long: say so and keep the session
                say(f"error: {e}", err=True)
                dialog.pop()
                break
            reply = stream_batch(llama, [tokens], [""], args, say, hide_tagged=bool(tool_args))[0]
            stats.append(llama.stats)
            message = llama.decode_reply(reply["ids"], reply["stop"], bool(tools)) if tool_args else \
                {"role": "assistant", "content": reply["text"]}
            dialog.append(message)
            if not message.get("tool_calls"):
                break
            call = message["tool_calls"][0]["function"]
            say(f"[tool call] {call['name']}({call['arguments']})")
            result = run_tool(message["tool_calls"][0])
            if result is None:
                break
            dialog.append({"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": result})
    say()
    return stats


def compile_notice(llama) -> str:
    """What --compile costs, said before the first token: torch.compile builds the decode step when
    the first reply's second token is due (inductor's C++ products and wrapper on a CPU: minutes, see
    docs/generation.md), and inductor's on-disk cache makes a later run quicker."""
    where = "1-3 minutes on a CPU" if llama.device.type == "cpu" else "a minute or less on a GPU"
    return (f"--compile: compiling the decode step first (about {where}; a later run reuses inductor's cache); "
            "the first reply waits for it")


def report(stats: list, say: Printer) -> None:
    prompt = sum(s.prompt_tokens for s in stats)
    generated = sum(s.generated_tokens for s in stats)
    steps, decode_s = sum(s.decode_steps for s in stats), sum(s.decode_s for s in stats)
    ttft = sum(s.time_to_first_token_s for s in stats) / max(len(stats), 1)
    speed = f"{steps / decode_s:.1f} tokens/s per sequence" if decode_s > 0 else "n/a"
    first = max((s.first_step_s for s in stats), default=0.0)
    if first > 1.0:  # --compile: the first step compiled
        speed += f" after a first step of {first:.0f} s (compiling)"
    say(f"[{prompt} prompt tokens, {generated} generated; time to first token {ttft * 1000:.0f} ms; "
        f"decode {speed}]", err=True)


def build_llama(args, max_batch_size: int):
    """Llama.build from the model flags (add_model_arguments), in a process that only generates."""
    from llama.generation.compile import keep_freed_memory
    from llama.generation import Llama

    keep_freed_memory()  # this process only generates: reuse freed activation memory (llama/generation/compile.py)
    set_torch_threads()  # the CPUs this process may use, unless OMP_NUM_THREADS says (llama/common/threads.py)
    if args.ckpt_dir is None:
        from llama.common.assets import smollm2_gguf

        args.ckpt_dir = smollm2_gguf()
    return Llama.build(args.ckpt_dir, args.tokenizer_path, max_seq_len=args.max_seq_len,
                       max_batch_size=max_batch_size, seed=args.seed, device=args.device,
                       dtype=parse_dtype(args.dtype), compile=args.compile, quantize=args.quantize,
                       lora=args.lora, group_size=args.group_size)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    say = Printer()
    try:
        check_args(args)
        prompts = DEMO_PROMPTS if args.prompt is None and not args.chat else (args.prompt or [])
        llama = build_llama(args, args.max_batch_size or max(len(prompts), 1))
        if args.compile:  # the first decode step compiles: say so before the wait, not after it
            say(compile_notice(llama), err=True)
        stats = chat(llama, args, say) if args.chat else run_prompts(llama, prompts, args, say)
        report(stats, say)
        return 0
    except USER_ERRORS as e:  # bad input (llama.common.errors.UserError) or a missing path: one line. Else a bug:
        return report_error(e)  # it keeps its traceback
    except KeyboardInterrupt:
        say("\ninterrupted", err=True)
        return 130
