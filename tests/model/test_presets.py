"""Presets: each builds, has the published parameter count, and bad names are config errors."""
import ast
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import ulysses_train.model as model_pkg
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import ModelConfig
from ulysses_train.config.validate import validate_model
from ulysses_train.model import GPT, PRESETS, model_config, num_params

# Qwen3-4B: 4.0B (its model card); Gemma 3 4B: 4.3B with a 417M SigLIP vision tower.
PUBLISHED = {"tinyllama_1b": 1.10e9, "llama3_8b": 8.03e9, "qwen3_4b": 4.02e9, "gemma3_4b": 3.88e9}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_on_meta(name):
    cfg = model_config(name)
    validate_model(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.tok_embeddings.weight.is_meta
    n = num_params(model)
    if name in PUBLISHED:
        assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, n


def test_tiny_is_the_default_model_config():
    assert asdict(model_config("tiny")) == asdict(ModelConfig())


def test_overrides_and_errors():
    cfg = model_config("llama_125m", n_layers=2, tie_embeddings=True)
    assert (cfg.name, cfg.n_layers, cfg.d_model, cfg.tie_embeddings) == ("llama_125m", 2, 768, True)
    with pytest.raises(ConfigError) as err:
        model_config("llama_7b")
    assert err.value.key == "model" and "tinyllama_1b" in err.value.message
    with pytest.raises(ConfigError):
        model_config("tiny", n_layer=2)


def test_model_package_imports_only_torch_and_the_stdlib():
    # Static instead of a subprocess (which costs a whole torch import): every module of the
    # package imports only torch, the standard library, its siblings and ulysses_train's
    # config package, so `import ulysses_train.model` cannot pull in hydra, wandb, datasets, ...
    package = Path(model_pkg.__file__).parent
    allowed_top = {"torch", *sys.stdlib_module_names}
    optional = {"flash_attn"}  # optional extras: only inside the function that uses them
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            elif isinstance(node, ast.ImportFrom):
                ok = node.level == 1 or (node.level == 2 and node.module.split(".")[0] == "config")
                assert ok, f"{path.name}: from {'.' * node.level}{node.module} import ..."
                continue
            else:
                continue
            allowed = allowed_top | optional if id(node) in lazy else allowed_top
            assert set(tops) <= allowed, f"{path.name} imports {tops}"
