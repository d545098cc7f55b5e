"""pyproject's version floors cover what the code uses: a user on the lowest declared version must
not meet an ImportError or a TypeError on the first run."""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (what the source uses, the regex that finds it, the version that introduced it)
PYTHON_FEATURES = [("tomllib", r"\bimport tomllib\b", (3, 11)), ("str.removeprefix", r"\.removeprefix\(", (3, 9)),
                   ("match statement", r"^\s*match .+:$", (3, 10))]
TORCH_FEATURES = [("SDPA enable_gqa", r"enable_gqa\s*=", (2, 5)), ("torch.load mmap", r"mmap\s*=\s*True", (2, 1)),
                  ("FSDP2 fully_shard", r"\bfully_shard\b", (2, 6)),
                  ("torch.nn.attention.sdpa_kernel", r"\bsdpa_kernel\b", (2, 3))]


def floor(spec: str) -> tuple:
    m = re.search(r">=\s*(\d+)\.(\d+)", spec)
    assert m, f"no >= floor in {spec!r}"
    return int(m.group(1)), int(m.group(2))


def sources() -> str:
    files = [*sorted((ROOT / "llama").rglob("*.py")), ROOT / "train.py", ROOT / "generate.py"]
    return "\n".join(f.read_text() for f in files)


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_python_floor_covers_the_code(project):
    text, python = sources(), floor(project["requires-python"])
    used = [(name, v) for name, pattern, v in PYTHON_FEATURES if re.search(pattern, text, re.M)]
    assert used, "the feature table no longer matches anything: update it"
    for name, version in used:
        assert python >= version, f"the code uses {name} (Python {version}) but requires-python is {python}"


def test_torch_floor_covers_the_code(project):
    torch_spec = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    text, torch_floor = sources(), floor(torch_spec)
    used = [(name, v) for name, pattern, v in TORCH_FEATURES if re.search(pattern, text, re.M)]
    assert ("SDPA enable_gqa", (2, 5)) in used  # the model's attention: the floor's main reason
    for name, version in used:
        assert torch_floor >= version, f"the code uses {name} (torch {version}) but the floor is {torch_floor}"
    assert torch_floor >= (2, 6), "FSDP2's public fully_shard (the sharded data-parallel work) needs torch 2.6"
