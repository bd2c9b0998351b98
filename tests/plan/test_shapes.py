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


@pytest.mark.parametrize("tied", [False, True])
def test_zero0_bf16_counts_a_step_long_copy_of_every_cast_weight(tied):
    """parallel/parallelize.py installs WeightCasts for bf16 without FSDP2: one bf16 copy of
    every weight but the untied embedding table lives for the whole step; under compile (no
    cache) only the checkpointed block's autocast casts."""
    from ulysses_train.plan.memory import gathered_bytes

    cfg = small_config(train={"precision": "bf16", "activation_checkpointing": "full"},
                       model={"tie_embeddings": tied})
    sh = shapes_of(cfg, 1)
    model = GPT(cfg.model)
    cast = sum(p.numel() for n, p in model.named_parameters()
               if tied or not n.startswith("tok_embeddings"))
    assert gathered_bytes(sh, 1) == 2 * cast
    cfg.train.compile = True
    assert gathered_bytes(shapes_of(cfg, 1), 1) == 2 * shapes_of(cfg, 1).block_matrix_params()
