"""Vision side of Kimi K2.5: media preprocessing (``preprocess``) and the MoonViT tower."""
