"""The headline workflow as docs/lora.md writes it: your chats -> LoRA -> chat with it -> compare with
the base. The commands are read from the page's workflow block, so the page and this test cannot drift;
each runs as its own process in a fresh directory holding the user's files, exactly as written except
for the overrides that cut its size (a few steps, short sequences, a few scored items)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the test appends to each documented command, and only that: sizes, never behaviour.
FOR_TIME = {"train.py": ["max_steps=4", "batch_size=2", "micro_batch_size=2", "seq_len=64", "warmup_steps=1",
                         "eval_every=2", "eval_batches=1"],
            "generate.py": ["--max-gen-len", "12"],
            "compare": ["--limit", "2", "--max-gen-len", "8", "--max-length", "128"]}


def documented_commands():
    """The commands between <!-- workflow --> and <!-- /workflow --> in docs/lora.md."""
    page = (ROOT / "docs" / "lora.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- workflow -->\s*```bash\n(.*?)```\s*<!-- /workflow -->", page, re.S)
    assert block, "docs/lora.md has no workflow block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def run(argv, cwd, stdin=None, timeout=1200):
    assert argv[0] == "python", argv
    extra = next(v for k, v in FOR_TIME.items() if k in argv)
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, *argv[1:], *extra], cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (argv, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.mark.slow  # three processes on SmolLM2 (a LoRA run of 4 steps, a chat reply, a comparison): minutes
def test_the_documented_workflow_runs_as_written(tmp_path):
    train, chat, compare = documented_commands()
    assert train[:2] == ["python", "train.py"] and chat[:2] == ["python", "generate.py"] and "compare" in compare
    # The user's directory: their chats (train / held out), and the repository's scripts and recipes.
    dialogs = (ROOT / "configs/train/chat_example.jsonl").read_text().splitlines()
    chats = next(a.split("=", 1)[1] for a in train if a.startswith("data="))
    held_out = compare[compare.index("--data") + 1]
    (tmp_path / chats).write_text("\n".join(dialogs[:18]) + "\n")
    (tmp_path / held_out).write_text("\n".join(dialogs[18:]) + "\n")
    for name in ("train.py", "generate.py", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)

    trained = run(train, tmp_path)
    closing = trained.stdout.strip().splitlines()[-2:]  # what train.py says to run next
    assert "--chat" in closing[0] and "--lora" in closing[0] and "generate.py" in closing[0], closing
    assert "llama.eval compare" in closing[1], closing
    metrics = [json.loads(line) for line in (tmp_path / "out/mine/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4]

    replied = run(chat, tmp_path, stdin="What is the capital of Peru?\n")
    reply = replied.stdout.split("> ")[1]  # the REPL's prompt, the streamed reply, its next prompt
    assert reply.strip(), replied.stdout

    run(compare, tmp_path)
    out = tmp_path / compare[compare.index("--out") + 1]
    report = json.loads((out / "scores.json").read_text())
    assert report["chat"] is True  # both are chat models: SmolLM2's template, an sft=true run
    base, tuned = report["models"]
    assert (base["ckpt"], tuned["ckpt"]) == ("smollm2", "out/mine")
    assert set(base["scores"]) == set(tuned["scores"]) == {"data", "general-perplexity", "general-accuracy"}
    assert report["prompts"] == [json.loads(d)["messages"][0]["content"] for d in dialogs[18:21]]
    # What the fine-tune gained: the held-out replies in the run's style are likelier (4 steps suffice:
    # the example chats share one terse style); the general measures exist for both, on the same items.
    assert tuned["scores"]["data"]["perplexity"] < 0.9 * base["scores"]["data"]["perplexity"], report
    for key in ("general-perplexity", "general-accuracy"):
        size = "tokens" if key.endswith("perplexity") else "items"
        assert base["scores"][key][size] == tuned["scores"][key][size] > 0
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "gained and lost" in (out / "report.md").read_text()
