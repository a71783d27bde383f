"""Checkpoints: reading Hugging Face safetensors, the streaming converter to Orbax, loading
a converted checkpoint (onto one device or a mesh), checking it against its checksums, and
size summaries."""

from kimi_jax.checkpoint.integrity import ChecksumError, VerifyReport, verify

__all__ = ["ChecksumError", "VerifyReport", "verify"]
