"""Hugging Face interchange: config.json <-> ModelConfig, parameter names, weights in and out.

Nothing here is imported by `import ulysses_train`; transformers is never imported by the
package (it is a test oracle and the export target only).
"""
