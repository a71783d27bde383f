"""Vision side of Kimi K2.5: media preprocessing (``preprocess``) and MoonViT with its
projector (``tower``)."""

from kimi_jax.vision.tower import MoonViT, VisionConfig, encode_media, vision_params_from_checkpoint_tree

__all__ = ["MoonViT", "VisionConfig", "encode_media", "vision_params_from_checkpoint_tree"]
