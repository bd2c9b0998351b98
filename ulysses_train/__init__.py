"""ulysses_train: long-sequence GPT pretraining with Ulysses sequence parallelism.

Importing the package is cheap: it pulls in torch and nothing else heavy (no hydra, omegaconf,
datasets, wandb or sentencepiece — those are imported where they are used).
"""
__version__ = "0.1.0"
