"""The model as pure math (no file I/O, no meshes built here): shared layers, Multi-head
Latent Attention, the MoE (router, experts, reference and grouped paths), the compressed KV
cache, the decoder, MoonViT with its projector, and ``Kimi``, the whole model."""

from kimi_jax.model.kimi import Kimi

__all__ = ["Kimi"]
