"""Model configuration: frozen dataclasses parsed from ``config.json`` (K2.5 wrapper, K2 /
DeepSeek-V3 text configs, the vision tower) and the packaged real K2.5 files (``presets/``).
The mesh layouts are data too: the repository's ``sharding/`` folder, parsed by
``kimi_jax.parallel``."""

from kimi_jax.config.model import (
    KimiConfig,
    TextConfig,
    UnsupportedConfigError,
    YarnScaling,
    builtin_config_dir,
    kimi_k25_config,
)

__all__ = ["KimiConfig", "TextConfig", "UnsupportedConfigError", "YarnScaling", "builtin_config_dir", "kimi_k25_config"]
