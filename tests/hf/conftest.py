"""Session-scoped Hugging Face fixtures: built once (transformers' save_pretrained, ~1 s)."""
import pytest

from support.hf import save_family, save_llama, save_windowed


@pytest.fixture(scope="session")
def hf_untied(tmp_path_factory):
    """Untied Llama, bf16, sharded into several files with model.safetensors.index.json."""
    return save_llama(str(tmp_path_factory.mktemp("hf_untied")), tie=False,
                      max_shard_size="40KB")


@pytest.fixture(scope="session")
def hf_tied(tmp_path_factory):
    """Tied Llama (no lm_head.weight on disk), bf16, one model.safetensors."""
    return save_llama(str(tmp_path_factory.mktemp("hf_tied")), tie=True, seed=1)


@pytest.fixture(scope="session")
def hf_windowed(tmp_path_factory):
    """{tag: HF dir}, fp32, window 8 (support/hf.py WINDOWED): Mistral (every layer slides),
    Qwen2 with transformers 5's layer_types, Qwen2 with max_window_layers only (config.json
    files written before transformers 5). Both Qwen2: full, sliding, sliding."""
    root = tmp_path_factory.mktemp("hf_windowed")
    return {"mistral": save_windowed(str(root / "mistral"), "mistral"),
            "qwen2": save_windowed(str(root / "qwen2"), "qwen2", seed=1),
            "qwen2-mwl": save_windowed(str(root / "qwen2-mwl"), "qwen2", seed=2,
                                       layer_types=False)}


@pytest.fixture(scope="session")
def hf_families(tmp_path_factory):
    """{tag: HF dir}, fp32 (support/hf.py save_family): "qwen3" (Qwen3ForCausalLM),
    "gemma3" (Gemma3ForCausalLM), "gemma3-vision" (Gemma3ForConditionalGeneration: the same
    kind of language model next to a tiny vision tower)."""
    root = tmp_path_factory.mktemp("hf_families")
    return {"qwen3": save_family(str(root / "qwen3"), "qwen3"),
            "gemma3": save_family(str(root / "gemma3"), "gemma3", seed=1),
            "gemma3-vision": save_family(str(root / "gemma3-vision"), "gemma3", seed=2,
                                         vision=True)}
