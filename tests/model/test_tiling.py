"""Tiled loss and tiled MLP compute the plain model's function (fp32, CPU): same loss sum, same
count, same gradients — and they really do hold fewer intermediates."""
from __future__ import annotations

import pytest
import torch

from ulysses_train.config.schema import ModelConfig
from ulysses_train.model import GPT
from ulysses_train.model.block import FeedForward
from ulysses_train.model.tiling import tiled_head_loss, tiled_mlp

CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=300)
SEQ = 50  # chunks of 16 leave a ragged last chunk of 2


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (2, SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, 7:30] = -100  # uneven valid counts across chunks
    return ids[:, :-1], torch.arange(SEQ).expand(2, SEQ), labels


def _loss_and_grads(tie: bool = False, **kw):
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    model = GPT(cfg, **kw)
    model.init_weights(0)
    ids, pos, labels = _batch()
    loss_sum, n_valid = model(ids, pos, labels)
    (loss_sum / n_valid).backward()
    return loss_sum.detach(), n_valid, {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("options", [{"loss_chunk": 16}, {"mlp_chunk": 16},
                                     {"loss_chunk": 7, "mlp_chunk": 9}],
                         ids=["loss", "mlp", "both"])
def test_tiled_model_equals_plain(tie, options):
    ref_loss, ref_n, ref_grads = _loss_and_grads(tie)
    loss, n, grads = _loss_and_grads(tie, **options)
    assert int(n) == int(ref_n)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", [0, 16], ids=["dense", "tiled"])
def test_loss_leaves_out_the_padded_vocab(tie, chunk):
    """vocab 300 in 384 head rows (randomly initialised, like every row): the loss, dense or
    tiled, is the cross-entropy over the 300 real logits, and the padded rows get no gradient."""
    model = GPT(ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie}), loss_chunk=chunk)
    model.init_weights(0)
    ids, pos, labels = _batch()
    with torch.no_grad():
        real = model(ids, pos)[..., :300]  # (B, S, 300)
    want = torch.nn.functional.cross_entropy(real.transpose(1, 2), labels, reduction="sum")
    loss_sum, _ = model(ids, pos, labels)
    loss_sum.backward()
    torch.testing.assert_close(loss_sum, want, rtol=1e-6, atol=1e-5)
    head = (model.tok_embeddings if tie else model.output).weight
    assert head.grad[:300].any() and not head.grad[300:].any()


def test_chunk_at_least_the_sequence_is_the_plain_path():
    """No recompute where tiling saves nothing: exactly the untiled graph (bit-equal)."""
    ref_loss, _, ref_grads = _loss_and_grads()
    loss, _, grads = _loss_and_grads(loss_chunk=SEQ, mlp_chunk=4 * SEQ)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)


def test_tiled_mlp_without_grad_matches():
    mlp = FeedForward(32, 48)
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(tiled_mlp(mlp, x, 16), mlp(x))


def _peak_saved_logits(chunk: int) -> int:
    """Largest (rows, vocab)-sized tensor autograd saves in forward for the head + loss."""
    model = GPT(CFG, loss_chunk=chunk)
    model.init_weights(0)
    _, _, labels = _batch()
    biggest = 0

    def pack(t):
        nonlocal biggest
        if t.dim() >= 2 and t.shape[-1] >= 300:  # a (.., Vpad) logits-like tensor
            biggest = max(biggest, t.numel())
        return t

    h = model.norm(torch.randn(2, SEQ, 64, requires_grad=True))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tiled_head_loss(h, labels, model._head_loss, chunk)
    return biggest


def test_tiled_loss_keeps_no_full_logits():
    vpad = GPT(CFG).vocab_size
    assert _peak_saved_logits(0) >= 2 * SEQ * vpad  # the plain loss keeps full logits
    assert _peak_saved_logits(16) == 0  # checkpointed chunks keep none in forward
