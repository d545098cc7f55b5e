"""generate.py: bad input ends in one line and a non-zero exit, the chat REPL keeps its history,
and under torchrun only rank 0 prints."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama.generation.cli import build_parser, chat, check_args, main
from tests.helpers import run_distributed, run_main, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mismatched_dir(tmp_path_factory, llama3_tokenizer_path):
    """Weights with a 1000-token vocabulary next to the 128256-token Llama 3 tokenizer."""
    return tiny_checkpoint(tmp_path_factory.mktemp("mismatch"), llama3_tokenizer_path, vocab_size=1000)


def run_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def assert_one_line_error(code, err, *words):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "-1"], ["temperature", "0 for greedy"]),
    (["--top-p", "0"], ["top_p", "(0, 1]"]),
    (["--top-p", "1.5"], ["top_p"]),
    (["--top-k", "-3"], ["top_k"]),
    (["--max-gen-len", "0"], ["--max-gen-len"]),
    (["--prompt", ""], ["--prompt number 2 is empty"]),
    (["--ckpt-dir", "/no/such/checkpoint"], ["/no/such/checkpoint", "no such file"]),
])
def test_bad_flags_fail_before_loading(flags, words, capsys):
    code = main(["--prompt", "Hi", *flags])
    assert_one_line_error(code, capsys.readouterr().err, *words)


def test_bad_inputs_that_need_the_checkpoint(tiny_dir, mismatched_dir, capsys):
    cases = [
        (["--ckpt-dir", tiny_dir, "--prompt", "word " * 50, "--max-seq-len", "32"],
         ["max_seq_len=32", "--truncate"]),
        (["--ckpt-dir", tiny_dir, "--prompt", "a", "--prompt", "b", "--max-batch-size", "1"],
         ["max_batch_size=1"]),
        (["--ckpt-dir", mismatched_dir, "--prompt", "Hi"], ["128256", "vocab_size is 1000"]),
        (["--ckpt-dir", tiny_dir, "--tokenizer-path", tiny_dir / "missing.model", "--prompt", "Hi"],
         ["missing.model"]),
    ]
    for flags, words in cases:
        code = main([str(f) for f in flags])
        assert_one_line_error(code, capsys.readouterr().err, *words)
    code = main(["--ckpt-dir", str(tiny_dir), "--prompt", "word " * 50, "--max-seq-len", "32", "--truncate",
                 "--max-gen-len", "3", "--temperature", "0"])
    assert code == 0


def test_real_process_exit_status_and_no_traceback(tiny_dir):
    """A fresh interpreter for the refusal; main() in this one for the run (importing torch again costs seconds)."""
    out = run_cli("--ckpt-dir", tiny_dir / "nope")
    assert_one_line_error(out.returncode, out.stderr, "nope")
    assert out.stdout == ""
    out = run_main(main, "--ckpt-dir", tiny_dir, "--prompt", "Hello", "--max-gen-len", "6", "--temperature", "0",
                   "--show-probs", "3")
    assert out.returncode == 0, out.stderr
    token_lines = out.stdout.strip().splitlines()[1:]
    assert len(token_lines) == 6 and all("|" in line for line in token_lines), out.stdout
    assert "time to first token" in out.stderr and "tokens/s" in out.stderr


def test_chat_repl_two_turns_through_stdin(smollm2, monkeypatch, capsys):
    llama = smollm2
    args = build_parser().parse_args(["--chat", "--temperature", "0", "--max-gen-len", "24",
                                      "--system", "You are terse."])
    turns = ["What is the capital of France?", "And of Germany?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
    stats = chat(llama, args, lambda text="", end="\n", err=False: print(text, end=end, file=sys.stderr if err else sys.stdout))
    shown = capsys.readouterr().out
    assert len(stats) == 2
    # what the REPL printed is what chat_completion gives for the same dialog, history included
    dialog = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": turns[0]}]
    first = llama.chat_completion([dialog], temperature=0, max_gen_len=24)[0]["generation"]
    dialog += [first, {"role": "user", "content": turns[1]}]
    second = llama.chat_completion([dialog], temperature=0, max_gen_len=24)[0]["generation"]
    assert shown == f"> {first['content']}\n> {second['content']}\n> \n"
    assert first["content"] != second["content"]


def test_chat_command_reads_stdin(tiny_dir, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nagain\n"))
    out = run_main(main, "--ckpt-dir", tiny_dir, "--chat", "--max-gen-len", "4", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    # prompts for: hello (answered), /reset (no reply), again (answered), end of input
    assert out.stdout.count("> ") == 4 and len(out.stdout.strip().splitlines()) == 3, out.stdout


def test_compile_says_so_before_the_first_token(tiny_dir, monkeypatch):
    """--compile announces the compile (and roughly how long) before anything is generated, with prompts
    and in the chat REPL. (The decode step compiles when a reply's second token is due: --max-gen-len 1
    stops before it, so nothing compiles here.)"""
    for extra, stdin, first_output in ((["--prompt", "Hello"], "", "Hello"), (["--chat"], "hello\n", "> ")):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        both = io.StringIO()  # stdout and stderr in the order they were written
        with contextlib.redirect_stdout(both), contextlib.redirect_stderr(both):
            code = main(["--ckpt-dir", str(tiny_dir), "--compile", "--max-gen-len", "1", "--temperature", "0", *extra])
        text = both.getvalue()
        assert code == 0, text
        notice = text.index("--compile: compiling the decode step first (about 1-3 minutes on a CPU")
        assert notice < text.index(first_output) and text.count("--compile:") == 1, text


@pytest.mark.slow
def test_torchrun_model_parallel_prints_once(tiny_dir):
    single = run_cli("--ckpt-dir", tiny_dir, "--prompt", "Hello", "--max-gen-len", "8", "--temperature", "0")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "generate.py"), "--ckpt-dir", str(tiny_dir), "--prompt", "Hello", "--max-gen-len", "8",
           "--temperature", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == single.stdout and out.stdout.count("Hello") == 1


def _cli_on_rank(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@pytest.mark.slow
def test_int8_per_row_under_model_parallel_is_refused_in_one_line(tiny_dir):
    """Groups work under model parallelism (tests/test_quantize.py); one int8 scale per row does not
    (a row-parallel layer's rows are split): two ranks each end, rank 0 with one line naming the fix."""
    argv = ["--ckpt-dir", str(tiny_dir), "--prompt", "Hi", "--quantize", "int8", "--group-size", "0",
            "--max-gen-len", "2"]
    for rank, (code, err) in enumerate(run_distributed(_cli_on_rank, 2, argv)):
        if rank == 0:
            assert_one_line_error(code, err, "--group-size 0", "2 model-parallel ranks", "use a group size")
        else:  # only rank 0 prints
            assert code != 0 and err == ""


def test_chat_repl_shows_a_tool_call_and_sends_the_pasted_result(tmp_path, llama3_tokenizer_path, monkeypatch, capsys):
    """--chat --tools: a reply that calls a tool is printed as one (never run), the pasted result goes
    back as a tool message, and the model's next prompt is the library's encoding of that dialog."""
    from llama.generation import Llama
    from llama.tokenizer import load_tokenizer
    from tests.helpers import scripted_checkpoint

    tok = load_tokenizer(llama3_tokenizer_path)
    call = tok.encode('brave_search.call(query="gold price")', bos=False, eos=False)
    chain = [271, tok.special_tokens["<|python_tag|>"], *call, tok.eom_id]
    llama = Llama.build(scripted_checkpoint(tmp_path, llama3_tokenizer_path, chain), max_seq_len=256,
                        max_batch_size=1, device="cpu")
    args = build_parser().parse_args(["--chat", "--temperature", "0", "--tools", "brave_search", "--today", "1 May 2025"])
    check_args(args)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What does gold cost?\n2650 USD\n\n"))
    stats = chat(llama, args, lambda text="", end="\n", err=False: print(text, end=end, file=sys.stderr if err else sys.stdout))
    shown = capsys.readouterr().out
    assert shown.count('[tool call] brave_search({"query": "gold price"})') == 2 and "python_tag" not in shown
    first = llama.chat_completion([[{"role": "user", "content": "What does gold cost?"}]], tools=["brave_search"],
                                  today="1 May 2025", temperature=0)[0]["generation"]
    dialog = [{"role": "user", "content": "What does gold cost?"}, first,
              {"role": "tool", "tool_call_id": "x", "content": "2650 USD"}]
    assert stats[1].prompt_tokens == len(llama.encode_dialog(dialog, tools=["brave_search"], today="1 May 2025"))
