"""Long-context evaluation: held-out loss by position and passkey retrieval, in any layout.

    evaluate_model(model, cfg, dims, data, dtype)  -> {"loss_by_position": [...], "passkey": [...]}

Pure functions of a built model (one process, sp, tp, dp, ZeRO: the training layout), the
parallel dims and the batches; `scripts/eval.py` (run.py) loads a checkpoint and writes
eval.json / eval.png, the trainer logs the loss by position every `eval.every` steps
(training.py). Token sums are exact in every layout (tokens.py).
"""
from .loss_by_position import bucket_edges, loss_by_position
from .passkey import passkey_accuracy
from .suite import evaluate_model, passkey_lengths, run_tokenizer

__all__ = ["bucket_edges", "evaluate_model", "loss_by_position", "passkey_accuracy",
           "passkey_lengths", "run_tokenizer"]
