"""Small helpers that know nothing of the package: atomic writes, content hashes, JSON files,
resident memory.
"""
