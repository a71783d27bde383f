"""``kimi_jax.generate``: prompts or conversations in, tokens, text and parsed messages out.

Prompts are token-id lists, strings (encoded as they are, special-token strings included)
or conversations (lists of chat messages, rendered with the checkpoint's chat template in
Instant or Thinking mode, see ``kimi_jax.chat``). The batch runs through
:class:`kimi_jax.engine.Engine`.
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.chat import RECOMMENDED_SAMPLING, ChatTemplate, ParsedOutput, parse_output
from kimi_jax.engine import Engine
from kimi_jax.model import Kimi
from kimi_jax.sampling import Sampling
from kimi_jax.tokenizer import Tokenizer

MODES = tuple(RECOMMENDED_SAMPLING)


@dataclasses.dataclass
class GenerationResult:
    """What one prompt produced.

    ``token_ids`` are the generated ids, ending with the stop id when one ended the output
    (``finish_reason`` ``"stop"``; otherwise ``"length"``). ``text`` (with a tokenizer) is
    their decoded text without that stop id. ``parsed`` (conversations only) splits the
    text into reasoning, answer and tool calls; ``parsed.to_message()`` is the assistant
    message to append to the conversation.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    text: str | None = None
    parsed: ParsedOutput | None = None


class TextDecoder:
    """Token ids to text pieces for streaming; bytes of an incomplete UTF-8 character are held back."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text that ``token_id`` completes (possibly empty)."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Whatever is held back, at the end of the stream."""
        return self._utf8.decode(b"", final=True)


def _is_token_ids(prompt: Any) -> bool:
    if isinstance(prompt, np.ndarray | jax.Array):
        return prompt.ndim == 1 and jnp.issubdtype(prompt.dtype, jnp.integer)
    return isinstance(prompt, Sequence) and not isinstance(prompt, str) and all(
        isinstance(t, int | np.integer) for t in prompt
    )


def _encode_prompt(
    i: int, prompt: Any, tokenizer: Tokenizer | None, template: ChatTemplate, tools: Any, thinking: bool,
) -> tuple[list[int], bool]:
    """Token ids of one prompt and whether it is a conversation."""
    if isinstance(prompt, Mapping):
        raise TypeError(f"prompt {i} is a single message; pass conversations as a list of them: [messages]")
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping)):
        if tokenizer is None:
            kind = "text" if isinstance(prompt, str) else "a conversation"
            raise ValueError(f"prompt {i} is {kind}, which needs a tokenizer (pass tokenizer=...)")
        if isinstance(prompt, str):
            return tokenizer.encode(prompt), False
        text = template.render(prompt, tools=tools, thinking=thinking)
        return tokenizer.encode(text), True
    if _is_token_ids(prompt):
        return [int(t) for t in prompt], False
    raise TypeError(
        f"prompt {i} is a {type(prompt).__name__}; a prompt is a list of token ids, a string "
        "or a conversation (a list of message dicts)"
    )


def generate(
    model: Kimi,
    prompts: Sequence[Sequence[int] | str | Sequence[Mapping[str, Any]]],
    *,
    tokenizer: Tokenizer | str | Path | None = None,
    chat_template: ChatTemplate | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    mode: str = "thinking",
    max_new_tokens: int = 512,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    prefill_chunk: int = 512,
    cache_dtype: jnp.dtype = jnp.bfloat16,
    cache_length: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[GenerationResult]:
    """Generates a continuation for each prompt of a batch; one :class:`GenerationResult` each.

    ``prompts`` mixes token-id lists, strings and conversations (message dicts as in
    :func:`kimi_jax.chat.render`). Strings and conversations need ``tokenizer``: a
    :class:`~kimi_jax.tokenizer.Tokenizer`, or a checkpoint folder to load it from, together
    with the folder's chat template. ``chat_template`` overrides the template (default: the
    folder's, else the built-in K2.5 renderer); ``tools`` are declared to conversations.

    ``mode`` (``"thinking"`` or ``"instant"``) selects the conversation prompt and the
    sampling defaults: ``temperature`` / ``top_p`` left as ``None`` take Moonshot's
    recommendation for the mode (``kimi_jax.chat.RECOMMENDED_SAMPLING``); temperature 0 is
    greedy; ``top_k`` 0 is off. ``seed`` makes sampling reproducible.

    Generation stops per prompt at ``<|im_end|>`` or ``[EOS]`` (with a tokenizer; without
    one at the config's ``eos_token_id``), at any of ``stop_ids``, or after
    ``max_new_tokens``. ``on_token(index, token_id)`` is called for every new token as it
    is produced. ``prefill_chunk``, ``cache_dtype`` and ``cache_length`` are passed to
    :meth:`kimi_jax.engine.Engine.stream`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    if isinstance(prompts, str | Mapping) or (_is_token_ids(prompts) and len(prompts)):
        raise TypeError("prompts must be a list of prompts, e.g. [[1, 2, 3]], ['text'] or [messages]")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if isinstance(tokenizer, str | Path):
        chat_template = chat_template or ChatTemplate.from_dir(tokenizer)
        tokenizer = Tokenizer.from_dir(tokenizer)
    thinking = mode == "thinking"
    template = chat_template or ChatTemplate()
    encoded = [_encode_prompt(i, p, tokenizer, template, tools, thinking) for i, p in enumerate(prompts)]
    media = model.config.media_placeholder_token_id
    for i, (ids, _) in enumerate(encoded):
        if media is not None and media in ids:
            raise ValueError(f"prompt {i} holds an image or video placeholder; generate handles text only")

    defaults = RECOMMENDED_SAMPLING[mode]
    sampling = Sampling(
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=top_k,
    )
    stops = set(stop_ids)
    if tokenizer is not None:
        stops.update(tokenizer.stop_ids)
    elif model.config.eos_token_id is not None:
        stops.add(model.config.eos_token_id)

    outputs: list[list[int]] = [[] for _ in encoded]
    steps = Engine(model).stream(
        [ids for ids, _ in encoded], max_new_tokens=max_new_tokens, sampling=sampling,
        key=jax.random.key(seed), stop_ids=stops, prefill_chunk=prefill_chunk,
        cache_length=cache_length, cache_dtype=cache_dtype,
    )
    for tokens in steps:
        for i, token in enumerate(tokens.tolist()):
            if token >= 0:
                outputs[i].append(token)
                if on_token is not None:
                    on_token(i, token)

    results = []
    for (prompt_ids, is_chat), out in zip(encoded, outputs, strict=True):
        stopped = out[-1] in stops
        result = GenerationResult(prompt_ids, out, "stop" if stopped else "length")
        if tokenizer is not None:
            result.text = tokenizer.decode(out[:-1] if stopped else out)
            if is_chat:
                result.parsed = parse_output(result.text, thinking=thinking)
        results.append(result)
    return results
