"""Sharded, resumable checkpoints: DCP save and load, the checkpoints/ directory, manifests and
hashes, the resume decision, a run's data identity.
"""
