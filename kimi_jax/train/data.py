"""Training examples from K2.5 conversations, and batches of them.

:func:`encode_conversation` turns a conversation into token ids with a mask that trains
exactly what the model generates: each assistant turn's completion (reasoning in Thinking
mode, ``</think>``, the answer, its tool calls, ``<|im_end|>``), everything else (system,
tool declarations, user turns, tool results, the assistant headers) being prompt. Each
assistant turn is appended to the prompt the chat template renders for the conversation so
far, as ``kimi_jax.generate`` would see it in an agent loop; the template must render that
turn as the same text (checked).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kimi_jax.chat.special import (
    IM_END,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)
from kimi_jax.chat.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Example:
    """Token ids and, per token, whether it is trained (predicted from the tokens before it)."""

    ids: tuple[int, ...]
    trained: tuple[bool, ...]


def completion_text(message: Mapping[str, Any], thinking: bool) -> str:
    """What the model writes after the generation prompt for assistant ``message``."""
    out = [f"{message.get('reasoning_content', '')}{THINK_END}" if thinking else "", message.get("content") or ""]
    calls = message.get("tool_calls") or []
    if calls:
        out.append(TOOL_CALLS_SECTION_BEGIN)
        for call in calls:
            args = call["function"]["arguments"]
            args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            out.append(f"{TOOL_CALL_BEGIN}{call['id']}{TOOL_CALL_ARGUMENT_BEGIN}{args}{TOOL_CALL_END}")
        out.append(TOOL_CALLS_SECTION_END)
    out.append(IM_END)
    return "".join(out)


def encode_conversation(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping] | None = None,
    thinking: bool = True,
) -> Example:
    """The :class:`Example` of a conversation whose assistant turns are trained (see the module doc).

    Text is encoded with special tokens allowed: the conversation must not contain
    special-token strings as data. ``ValueError`` if it has no assistant turn or the template
    renders an assistant turn differently from what generation produces.
    """
    template = tokenizer.chat_template
    pieces: list[tuple[str, bool]] = []
    text = ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = template.render(messages[:i], tools=tools, thinking=thinking, add_generation_prompt=True)
        if not prompt.startswith(text):
            raise ValueError(f"message {i}: the chat template renders the earlier assistant turn differently "
                             "from what the model generates; this conversation cannot be trained as an agent loop")
        completion = completion_text(message, thinking)
        pieces += [(prompt[len(text):], False), (completion, True)]
        text = prompt + completion
    if not pieces:
        raise ValueError("the conversation has no assistant message to train on")
    ids: list[int] = []
    trained: list[bool] = []
    for piece, train in pieces:
        piece_ids = tokenizer.encode(piece, allow_special=True)
        ids += piece_ids
        trained += [train] * len(piece_ids)
    return Example(tuple(ids), tuple(trained))


def make_batch(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch (``inputs``, ``targets``, ``weights``, ``valid``: [B, seq_len]) of ``examples``,
    right-padded with ``pad_id``; ``ValueError`` for an example longer than ``seq_len + 1``."""
    B = len(examples)
    inputs = np.full((B, seq_len), pad_id, np.int32)
    targets = np.full((B, seq_len), pad_id, np.int32)
    weights = np.zeros((B, seq_len), np.float32)
    valid = np.zeros((B, seq_len), bool)
    for b, ex in enumerate(examples):
        n = len(ex.ids) - 1
        if n > seq_len:
            raise ValueError(f"example {b} has {len(ex.ids)} tokens; batches hold seq_len + 1 = {seq_len + 1}")
        inputs[b, :n] = ex.ids[:-1]
        targets[b, :n] = ex.ids[1:]
        weights[b, :n] = ex.trained[1:]
        valid[b, :n] = True
    return {"inputs": inputs, "targets": targets, "weights": weights, "valid": valid}
