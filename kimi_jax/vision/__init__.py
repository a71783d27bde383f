"""Vision side of Kimi K2.5: media preprocessing (``preprocess``), MoonViT with its projector
(``tower``) and the media of prompts (``media``)."""

from kimi_jax.vision.tower import MoonViT, VisionConfig, encode_media, vision_params_from_checkpoint_tree

__all__ = ["MoonViT", "VisionConfig", "encode_media", "vision_params_from_checkpoint_tree"]
