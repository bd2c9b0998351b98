"""plan/shapes.py resolves the shapes the model builds: head_dim, the parameters of every block
switch, for Llama-, Qwen3- and Gemma-3-shaped models at their real sizes (built on meta)."""
import pytest
import torch

from support.common import small_config
from ulysses_train.model import PRESETS
from ulysses_train.model.gpt import GPT
from ulysses_train.plan.shapes import shapes_of


@pytest.mark.parametrize("name", ["llama3_8b", "qwen3_4b", "gemma3_4b"])
def test_params_and_head_dim_are_the_models(name):
    """Shapes.params() (tp 1) is the model's parameter count: QK-norm's 2 D and the sandwich
    norms' 2 d per block included; D is model.head_dim (Qwen3 128, Gemma 3 256 on d 2560)."""
    cfg = small_config(model=PRESETS[name], data={"seq_len": 4096})
    sh = shapes_of(cfg, 1)
    with torch.device("meta"):
        model = GPT(cfg.model)
    assert sh.params() == sum(p.numel() for p in model.parameters())
    assert sh.D == model.head_dim == model.layers[0].attention.wq.out_features // sh.hq
