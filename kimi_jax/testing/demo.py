"""The demo's models: the trained calculator model shipped with the package, and tiny random
K2.5 checkpoints complete with a tokenizer and the chat template; and a synthetic picture.

``kimi-jax demo`` converts the trained model, chats with it and runs it as an agent. The
random checkpoints serve the tests and notebooks. The tokenizer is a small
byte-level tiktoken vocabulary laid out like Kimi's: base ranks (the 256 bytes, then merges
of common English pieces), followed by the 256 special ids, named as in the real
``tokenizer_config.json``. ``k25_config`` keeps the special ids at the same distance from
the end of the vocabulary as the real ones, so they line up with the tokenizer's.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kimi_jax.chat.tokenizer import NUM_SPECIAL_TOKENS
from kimi_jax.config.model import builtin_config_dir, kimi_k25_config
from kimi_jax.testing.synthetic import (
    TINY_TEXT,
    TINY_VISION,
    k25_config,
    write_checkpoint,
)

CALCULATOR_MODEL = Path(__file__).parent / "calculator"
"""The embedded default model, in the official Hugging Face layout: a small K2.5-architecture
model (MLA, 16 routed + 1 shared experts, the demo's tokenizer) trained by the ``calculator``
recipe (``kimi-jax train --recipe calculator``) to answer arithmetic and unit questions
with the ``calculator`` tool in Thinking and Instant mode. Its tiny MoonViT is untrained."""

DEMO_VOCAB_SIZE = 640
"""The demo's vocabulary: 256 bytes + 128 merges + 256 special ids."""

_PIECES = (
    " the", " and", " you", " what", " is", " of", " to", " in", " that", " it", " for", " with",
    " are", " this", " can", " how", " Hello", " Kimi", " model", " answer", "ing", "ed", "er",
)
_LETTERS = "etaoinshrdlucmfwypvbgkjqxz"


def merges(count: int) -> list[bytes]:
    """``count`` merged tokens, each an earlier token plus one byte (so BPE can reach it):
    the prefixes of common English pieces, then pairs of lowercase letters."""
    known = {bytes([b]) for b in range(256)}
    candidates = [p.encode()[:k] for p in _PIECES for k in range(2, len(p) + 1)]
    candidates += [(a + b).encode() for a in _LETTERS for b in _LETTERS]
    out = []
    for token in candidates:
        if len(out) == count:
            return out
        if token not in known:
            known.add(token)
            out.append(token)
    if len(out) < count:
        raise ValueError(f"the demo tokenizer has at most {len(out)} merges, {count} asked for")
    return out


def write_tokenizer(folder: str | Path, vocab_size: int) -> Path:
    """Writes ``tiktoken.model``, ``tokenizer_config.json``, ``chat_template.jinja`` and
    ``generation_config.json`` for a vocabulary of ``vocab_size`` ids (at least 512)."""
    folder = Path(folder)
    base = vocab_size - NUM_SPECIAL_TOKENS
    if base < 256:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {256 + NUM_SPECIAL_TOKENS}, got {vocab_size}")
    ranks = [bytes([b]) for b in range(256)] + merges(base - 256)
    (folder / "tiktoken.model").write_text(
        "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks))
    )
    real = builtin_config_dir("kimi-k2.5")
    shift = base - (kimi_k25_config().text.vocab_size - NUM_SPECIAL_TOKENS)
    config: dict[str, Any] = json.loads((real / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(int(k) + shift): v for k, v in config["added_tokens_decoder"].items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    eos = json.loads((real / "generation_config.json").read_text())["eos_token_id"] + shift
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2))
    shutil.copy2(real / "chat_template.jinja", folder / "chat_template.jinja")
    return folder


def write_demo_checkpoint(folder: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Writes the demo's random K2.5 checkpoint (two shards, bfloat16) with its tokenizer; returns its config."""
    config = k25_config(dict(TINY_TEXT, vocab_size=DEMO_VOCAB_SIZE), TINY_VISION)
    write_checkpoint(folder, config, seed=seed, shards=2)
    write_tokenizer(folder, DEMO_VOCAB_SIZE)
    return config


def write_demo_image(path: str | Path, width: int = 84, height: int = 56) -> Path:
    """Writes a small synthetic PNG (sky, grass and a red sun, drawn with numpy); returns its path."""
    y, x = np.mgrid[:height, :width]
    pixels = np.zeros((height, width, 3), np.uint8)
    sky = y < height * 2 // 3
    pixels[sky] = np.stack([90 + y[sky], 150 + y[sky], np.full(sky.sum(), 235)], axis=-1)
    pixels[~sky] = (40, 160, 60)
    pixels[(x - width * 3 // 4) ** 2 + (y - height // 4) ** 2 < (height // 6) ** 2] = (230, 40, 30)
    Image.fromarray(pixels).save(path)
    return Path(path)
