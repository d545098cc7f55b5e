"""Where a tokenizer is: an asset name (llama3, smollm2), a file, or a checkpoint directory holding one."""

from pathlib import Path

from llama.common import assets
from llama.tokenizer.errors import TokenizerError


# Tokenizer names usable wherever a tokenizer path is asked for (fetched once, see llama/common/assets.py).
TOKENIZER_ASSETS = {"llama3": "llama3-tokenizer", "smollm2": "smollm2"}


def tokenizer_file(value, flag: str = "tokenizer") -> Path:
    """The tokenizer file that `value` names: an asset name (llama3, smollm2), a tokenizer file, or a
    directory holding one (a checkpoint or a training run's out_dir). train.py, data prepare and the
    checkpoint loaders resolve tokenizers here. `flag` names the option in error messages."""
    if str(value) in TOKENIZER_ASSETS:
        return assets.fetch(TOKENIZER_ASSETS[str(value)])
    path = Path(value)
    if path.is_dir() and (path / "latest").is_file() and not (path / "params.json").exists():
        path = path / (path / "latest").read_text().strip()  # a training run: its newest checkpoint
    if path.is_dir():
        for candidate in [path / "tokenizer.model", path / "tokenizer.json", *sorted(path.glob("*.gguf"))[:1],
                          path.parent / "tokenizer.model"]:  # Meta's downloads keep it one folder up
            if candidate.is_symlink() or candidate.exists():
                return tokenizer_file(candidate, flag)
        raise TokenizerError(f"{value}: no tokenizer.model, tokenizer.json or .gguf file in this directory: "
                             f"pass the tokenizer file with {flag}")
    if path.is_symlink() and not path.exists():
        raise TokenizerError(f"{path} is a link to {path.readlink()}, which no longer exists: "
                             f"pass the tokenizer file with {flag}")
    if not path.exists():
        raise TokenizerError(f"{flag} {value} does not exist: give a tokenizer file, a checkpoint directory "
                             f"or one of {', '.join(TOKENIZER_ASSETS)}")
    return path
