"""The padded vocabulary columns take no probability (model/vocab.py), so a model's loss is the
one transformers computes over the real vocabulary, and the same from its run dir and its export.

- An imported tiny Llama (vocab 300, our head padded to 384, bf16 on disk, read into fp32): the
  training forward's loss, evaluation's per-token loss and top-1 (`token_stats`, what
  scripts/eval.py and the in-training eval use) and `loss_by_position` equal transformers'
  `LlamaForCausalLM(..., labels=...).loss` and its logits' cross-entropy and argmax on the same
  256 tokens within 1e-5. Before the mask the 84 zero padding rows added a logit of 0 each to
  the normaliser (issue 19 item 1: 7.18609 against 7.11866).
- A one-step run (vocab 300) evaluated from its run dir and from its own fp32 export: the same
  per-token losses (the run's padding rows are random, the export's reloaded ones zero).
- data=synthetic in training and in eval.py draws ids below model.vocab_size (a padded id as
  target would now cost inf).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from support.common import cpu_dims, small_config
from support.hf import hf_logits, model_config
from ulysses_train.cli.export import main as export_main
from ulysses_train.evaluate.loss_by_position import loss_by_position
from ulysses_train.evaluate.tokens import token_stats
from ulysses_train.hf.init_from import load_initial_weights
from ulysses_train.parallel.parallelize import build_model
from ulysses_train.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
VOCAB, SEQ, ROWS = 300, 64, 4  # 4 x 64 = 256 predicted tokens


def _tokens(vocab: int = VOCAB):
    """(ids (ROWS, SEQ + 1), input_ids, position_ids, labels), the last three (ROWS, SEQ)."""
    ids = torch.randint(0, vocab, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(5))
    return ids, ids[:, :-1], torch.arange(SEQ).repeat(ROWS, 1), ids[:, 1:]


def _loaded(source: str, cfg):
    dims = cpu_dims()
    model = build_model(cfg, dims)
    load_initial_weights(model, source, cfg.model, dims)
    return model, dims


def _hf_loss(hf_dir: str, ids: torch.Tensor) -> float:
    """transformers' own mean loss for `labels=ids` (it shifts them itself), fp32."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_loss_of_an_imported_model_equals_transformers(hf_untied, hf_tied, tie):
    hf_dir = hf_tied if tie else hf_untied
    cfg = small_config(data={"seq_len": SEQ})
    cfg.model = model_config(hf_dir)
    assert cfg.model.vocab_size == VOCAB
    model, dims = _loaded(hf_dir, cfg)
    ids, inputs, positions, labels = _tokens()
    theirs = _hf_loss(hf_dir, ids)
    logits = hf_logits(hf_dir, inputs)  # (B, S, 300)
    with torch.no_grad():
        loss_sum, count = model(inputs, positions, labels)  # the training forward
    loss, correct = token_stats(model, inputs, positions, labels)  # evaluation's terms
    (row,) = loss_by_position(model, dims, [(inputs, positions, labels, None)], [0, SEQ])
    print(f"{'tied' if tie else 'untied'}: ours {float(loss_sum / count):.5f} "
          f"transformers {theirs:.5f}")  # pytest -s shows it
    assert int(count) == row["tokens"] == ROWS * SEQ
    assert abs(float(loss_sum / count) - theirs) <= 1e-5
    assert abs(row["loss"] - theirs) <= 1e-5
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, S)
    torch.testing.assert_close(loss, per_token, rtol=0, atol=1e-5)
    assert torch.equal(correct, logits.argmax(-1) == labels)


def test_run_dir_and_its_export_give_the_same_loss(tmp_path):
    cfg = small_config(model={"vocab_size": VOCAB}, train={"steps": 1})
    cfg.data.cache_dir = str(tmp_path / "cache")
    run = str(tmp_path / "run")
    Trainer(cfg, run, cpu_dims()).fit()
    out = tmp_path / "hf"
    assert export_main([run, str(out), "--dtype", "fp32"]) == 0
    _, inputs, positions, labels = _tokens()
    results = []
    for source in (run, str(out)):
        model, _ = _loaded(source, cfg)
        head = model.output.weight
        results.append((token_stats(model, inputs, positions, labels), head[VOCAB:].abs().max()))
    ((run_loss, run_top1), run_pad), ((hf_loss, hf_top1), hf_pad) = results
    assert run_pad > 0 and hf_pad == 0  # the run's padding rows are its init, the export's zero
    torch.testing.assert_close(hf_loss, run_loss, rtol=0, atol=1e-5)
    assert torch.equal(hf_top1, run_top1)


class _Built(Exception):
    """Stops an entry point right after it built its data."""


def test_training_and_evaluation_data_draw_ids_below_the_real_vocab(tmp_path, monkeypatch):
    """data=synthetic draws below the model's vocab_size, not its padded row count: a padded id
    as target would have loss inf. The trainer's source (sampled) and evaluation's (eval.py's
    _evaluate, stopped after build_data) both get model.vocab_size."""
    from ulysses_train.data import build_data
    from ulysses_train.evaluate import run as eval_run

    cfg = small_config(model={"vocab_size": VOCAB})
    cfg.data.cache_dir = str(tmp_path / "cache")
    data = Trainer(cfg, str(tmp_path / "run"), cpu_dims()).data
    assert data.vocab_size == VOCAB
    ids = torch.cat([data.global_batch(step).input_ids for step in range(200)])  # 25.6k ids
    assert int(ids.max()) < VOCAB
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs, source=build_data(*args, **kwargs))
        raise _Built

    monkeypatch.setattr("ulysses_train.data.build_data", spy)
    with pytest.raises(_Built):
        eval_run._evaluate(cfg, str(tmp_path / "eval"), cpu_dims())
    assert seen["model_vocab_size"] == seen["source"].vocab_size == VOCAB
