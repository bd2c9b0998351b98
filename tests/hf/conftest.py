"""Session-scoped Hugging Face fixtures: built once (transformers' save_pretrained, ~1 s)."""
import pytest

from support.hf import save_llama


@pytest.fixture(scope="session")
def hf_untied(tmp_path_factory):
    """Untied Llama, bf16, sharded into several files with model.safetensors.index.json."""
    return save_llama(str(tmp_path_factory.mktemp("hf_untied")), tie=False,
                      max_shard_size="40KB")


@pytest.fixture(scope="session")
def hf_tied(tmp_path_factory):
    """Tied Llama (no lm_head.weight on disk), bf16, one model.safetensors."""
    return save_llama(str(tmp_path_factory.mktemp("hf_tied")), tie=True, seed=1)
