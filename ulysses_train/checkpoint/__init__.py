"""Sharded, resumable checkpoints: DCP save and load, the checkpoints/ directory, manifests and
hashes, the resume decision, a run's data identity.
"""
import warnings

# DCP warns on every save and load without a process group; a single process is what we intend,
# and every DCP read or write of the package (resume, model.init_from, export, eval) goes
# through this package. A filter, not catch_warnings: async saves warn from DCP's thread, and
# catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                        "uninitialized, assuming the intent")
