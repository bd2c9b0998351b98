"""The training loop: Trainer, optimizer and schedule, non-finite guards, polite stop, metrics and
wandb, and the debug.* fault hooks.
"""
