"""The trainer loads `model.init_from` into a run that starts, never over its own checkpoint.

A one-step run from the HF dir saves a checkpoint; rerunning it with more steps resumes from
that checkpoint, and the weights it continues from must be the checkpoint's (which one step of
training moved away from the HF weights), with a log line saying which source won.
"""
from __future__ import annotations

import pytest
import torch

from helpers import cpu_dims, small_config
from hf_fixtures import model_config
from ulysses_train.model.init import canonical_name
from ulysses_train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _params(model) -> dict[str, torch.Tensor]:
    return {canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}


def _trainer(hf_dir: str, run_dir: str, steps: int) -> Trainer:
    cfg = small_config(train={"steps": steps}, data={"seq_len": 16}, checkpoint={"every": 1})
    cfg.model = model_config(hf_dir)
    cfg.model.init_from = hf_dir
    return Trainer(cfg, run_dir, cpu_dims())


def test_init_from_loads_for_a_new_run_and_resume_wins(hf_untied, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    first = _trainer(hf_untied, run_dir, steps=1)
    loaded = _params(first.model)
    log = capsys.readouterr().out
    assert f"model.init_from: loaded 0.07M parameters (bf16 -> fp32) from Hugging Face model " \
           f"dir {hf_untied}" in log
    first.fit()
    trained = _params(first.model)
    assert any(not torch.equal(trained[k], loaded[k]) for k in loaded)  # the step moved them
    capsys.readouterr()

    second = _trainer(hf_untied, run_dir, steps=2)
    log = capsys.readouterr().out
    assert second.resumed_from is not None and second.step == 1
    assert f"model.init_from={hf_untied} not loaded: resuming from" in log
    assert "model.init_from: loaded" not in log
    resumed = _params(second.model)
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)
