"""The configuration: schema dataclasses (schema.py), the pure rules on their values (validate.py,
parallel.py, plan.py), the architecture keys (architecture.py) and the errors every entry point
reports (errors.py). The leaf of the package: it imports nothing else of ulysses_train, and
nothing here reads a file.
"""
from .errors import ConfigError, InputUnreadable, RunStopped
from .schema import (
                     CheckpointConfig,
                     Config,
                     DataConfig,
                     DebugConfig,
                     EvalConfig,
                     LoggingConfig,
                     ModelConfig,
                     OptimConfig,
                     ParallelConfig,
                     PlanConfig,
                     SourceConfig,
                     TrainConfig,
                     WandbConfig,
)
from .validate import validate

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "DebugConfig", "EvalConfig",
           "InputUnreadable", "LoggingConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
           "PlanConfig", "RunStopped", "SourceConfig", "TrainConfig", "WandbConfig", "validate"]
