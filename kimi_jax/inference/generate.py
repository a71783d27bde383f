"""``kimi_jax.generate``: prompts or conversations in, tokens, text and parsed messages out.

Prompts are token-id lists, strings (encoded as they are, special-token strings included)
or conversations (lists of chat messages, rendered with the checkpoint's chat template in
Instant or Thinking mode, see ``kimi_jax.chat.template``). The batch runs through
:class:`kimi_jax.inference.engine.Engine`.

Media: a conversation's image and video parts are loaded and preprocessed here
(``kimi_jax.media.placeholders``, ``kimi_jax.media.preprocess``); token-id and text prompts take
theirs from ``pixel_values`` / ``grid_thws``. Each medium's run of ``<|media_pad|>`` is
expanded to its token count before the prompts reach the engine.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.chat.parser import ParsedOutput, parse_output
from kimi_jax.chat.template import ChatTemplate
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.chat.tool_ids import ToolIdMap, normalize_tool_ids
from kimi_jax.inference.engine import Engine
from kimi_jax.inference.sampling import RECOMMENDED_SAMPLING, Sampling
from kimi_jax.inference.steps import CACHE_ROUNDING
from kimi_jax.media.placeholders import (
    conversation_media,
    expand_media_placeholders,
    insert_video_chunks,
    placeholder_runs,
    preprocess_conversation_media,
)
from kimi_jax.media.preprocess import PreprocessConfig
from kimi_jax.model.inputs import check_prompts
from kimi_jax.model.kimi import Kimi

MODES = tuple(RECOMMENDED_SAMPLING)


@dataclasses.dataclass
class GenerationResult:
    """What one prompt produced.

    ``prompt_ids`` are the ids the model was given (media placeholders expanded to one per
    media token). ``token_ids`` are the generated ids, ending with the stop id when one ended
    the output (``finish_reason`` ``"stop"``; otherwise ``"length"``). ``text`` (with a
    tokenizer) is their decoded text without that stop id. ``parsed`` (conversations only) splits the
    text into reasoning, answer and tool calls (calls written with foreign ids named from
    ``tools``, see :class:`~kimi_jax.chat.parser.ToolCall`); ``parsed.to_message()`` is the
    assistant message to append to the conversation. ``tool_ids`` (conversations only) maps
    the tool-call ids the prompt was written with back to the client's, for the history's
    calls whose ids were not ``functions.NAME:INDEX`` (:mod:`kimi_jax.chat.tool_ids`; empty
    when none were rewritten).
    """

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    text: str | None = None
    parsed: ParsedOutput | None = None
    tool_ids: ToolIdMap | None = None


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
        isinstance(t, int | np.integer) and not isinstance(t, bool) for t in prompt
    )


@dataclasses.dataclass
class _Prompt:
    """One encoded prompt: its ids (placeholders not yet expanded), whether it is a
    conversation, and the media of a conversation (``pixel_values``, ``grid_thws``)."""

    ids: list[int]
    is_chat: bool
    media: tuple[np.ndarray, np.ndarray] | None = None
    tool_ids: ToolIdMap | None = None


def _encode_prompt(
    i: int, prompt: Any, tokenizer: Tokenizer | None, template: ChatTemplate | None, tools: Any, thinking: bool,
    preprocessor: PreprocessConfig,
) -> _Prompt:
    """Token ids of one prompt; a conversation's media are read and preprocessed too.

    A string is a raw prompt: special-token strings in it become special ids (write the
    chat format by hand). A conversation is encoded with ``Tokenizer.encode_chat``: only the
    template's own special tokens are special, special-token strings in messages are text.
    """
    if isinstance(prompt, Mapping):
        raise TypeError(f"prompt {i} is a single message; pass conversations as a list of them: [messages]")
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping)):
        if tokenizer is None:
            kind = "text" if isinstance(prompt, str) else "a conversation"
            raise ValueError(f"prompt {i} is {kind}, which needs a tokenizer (pass tokenizer=...)")
        if isinstance(prompt, str):
            return _Prompt(tokenizer.encode(prompt), False)
        try:
            media = conversation_media(prompt, preprocessor)
            ids = tokenizer.encode_chat(prompt, tools=tools, thinking=thinking, template=template,
                                        postprocess=lambda text: insert_video_chunks(text, media))
            pixels = preprocess_conversation_media(media, preprocessor) if media else None
            tool_ids = normalize_tool_ids(prompt)[1]
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        return _Prompt(ids, True, pixels, tool_ids)
    if _is_token_ids(prompt):
        return _Prompt([int(t) for t in prompt], False)
    raise TypeError(
        f"prompt {i} is a {type(prompt).__name__}; a prompt is a list of token ids, a string "
        "or a conversation (a list of message dicts)"
    )


def _attach_media(
    model: Kimi, prompts: list[_Prompt], pixel_values: Any, grid_thws: Any
) -> tuple[list[list[int]], list[tuple[np.ndarray, np.ndarray] | None]]:
    """The prompts with each medium's placeholder run expanded, and each prompt's media
    (``pixel_values``, ``grid_thws``; None without media).

    Conversations bring their own media; the token-id and text prompts share ``pixel_values``
    / ``grid_thws``, one medium per run of placeholders, in order.
    """
    placeholder = model.config.media_placeholder_token_id
    vision = model.vision_config
    given = (np.zeros((0, 3, 1, 1), np.float32), np.zeros((0, 3), np.int64))
    if (pixel_values is None) != (grid_thws is None):
        raise ValueError("pass pixel_values and grid_thws together")
    if grid_thws is not None:
        given = (np.asarray(pixel_values), np.asarray(grid_thws).reshape(-1, 3))
    patches = np.concatenate([[0], np.cumsum(given[1].prod(axis=1))]).astype(int)
    taken = 0
    expanded, per_prompt = [], []
    for i, p in enumerate(prompts):
        runs = len(placeholder_runs(np.asarray(p.ids), placeholder)) if placeholder is not None else 0
        if p.media is not None:
            media = p.media
        else:
            end = min(taken + runs, len(given[1]))
            media = (given[0][patches[taken] : patches[end]], given[1][taken:end])
            taken = end
        if runs and vision is None:
            raise ValueError(f"prompt {i} holds an image or video placeholder, but the model has no vision tower")
        if runs != len(media[1]):
            source = "its image and video parts" if p.is_chat else "grid_thws"
            raise ValueError(
                f"prompt {i} holds {runs} image or video placeholder(s) (runs of <|media_pad|>, id {placeholder}), "
                f"but {source} give {len(media[1])} media for it"
            )
        if runs:
            ids = expand_media_placeholders(
                p.ids, media[1], placeholder_id=placeholder, merge_kernel_size=vision.merge_kernel_size
            )
            expanded.append(ids.tolist())
            per_prompt.append(media)
        else:
            expanded.append(p.ids)
            per_prompt.append(None)
    if taken != len(given[1]):
        raise ValueError(
            f"grid_thws has {len(given[1])} media, but the token-id and text prompts hold only {taken} "
            "image or video placeholders"
        )
    return expanded, per_prompt


def generation_stop_ids(folder: str | Path) -> list[int]:
    """The ``eos_token_id`` of a checkpoint folder's ``generation_config.json`` (an id or a list), if any.

    ``ValueError`` naming the file if it is not JSON or the value is not a token id or a list of them.
    """
    path = Path(folder).expanduser() / "generation_config.json"
    if not path.is_file():
        return []
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a JSON object")
    eos = d.get("eos_token_id")
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id={eos!r:.60} is not a token id or a list of token ids")
    return list(ids)


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
    pixel_values: np.ndarray | None = None,
    grid_thws: np.ndarray | None = None,
    preprocessor: PreprocessConfig | None = None,
    engine: Engine | None = None,
) -> list[GenerationResult]:
    """Generates a continuation for each prompt of a batch; one :class:`GenerationResult` each.

    ``prompts`` mixes token-id lists, strings and conversations (message dicts as in
    :func:`kimi_jax.chat.template.render`). Strings and conversations need ``tokenizer``: a
    :class:`~kimi_jax.chat.tokenizer.Tokenizer`, or a checkpoint folder to load it from.
    Conversations are rendered with ``chat_template`` if given, else the tokenizer's (its
    folder's template, the built-in K2.5 renderer for a folder without one), the same whether
    ``tokenizer`` is a folder or a Tokenizer loaded from it; ``tools`` are declared to them.

    ``mode`` (``"thinking"`` or ``"instant"``) selects the conversation prompt and the
    sampling defaults: ``temperature`` / ``top_p`` left as ``None`` take Moonshot's
    recommendation for the mode (``kimi_jax.inference.sampling.RECOMMENDED_SAMPLING``); temperature 0 is
    greedy; ``top_k`` 0 is off. ``seed`` makes sampling reproducible.

    Generation stops per prompt at ``<|im_end|>`` or ``[EOS]`` (with a tokenizer; without
    one at the config's ``eos_token_id``), at any of ``stop_ids``, or after
    ``max_new_tokens``. ``on_token(index, token_id)`` is called for every new token as it
    is produced. The batch runs on a :class:`~kimi_jax.inference.engine.Engine` with one
    slot per prompt of ``cache_length`` tokens (default: the longest prompt plus
    ``max_new_tokens``, rounded up to a multiple of 128 within the model's context), fed
    ``prefill_chunk`` prompt tokens per step, its cache in ``cache_dtype``; prompt ``i``
    samples with seed ``seed + i``. Pass an ``engine`` to run on it instead (its slots and
    cache length; the other three are then unused): what its slots hold from earlier calls
    is reused, so the next turn of a conversation prefills only its new tokens.

    Media: conversations' image and video parts (see
    :func:`kimi_jax.media.placeholders.conversation_media`: file paths, PIL images, arrays,
    ``data:`` URLs, video chunks) are preprocessed with ``preprocessor`` (default: the
    tokenizer folder's ``preprocessor_config.json``, else K2.5's). Token-id and text prompts
    take ``pixel_values`` / ``grid_thws`` (as ``preprocess_media`` returns them) for their
    ``<|media_pad|>`` placeholders, in prompt order, one medium per run of placeholders: a
    single placeholder per medium as Moonshot's processor writes it, or already one per
    media token. Unreadable media, or placeholders that do not match the media, raise
    ``ValueError``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    if isinstance(prompts, str | Mapping) or (_is_token_ids(prompts) and len(prompts)):
        raise TypeError("prompts must be a list of prompts, e.g. [[1, 2, 3]], ['text'] or [messages]")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    folder_stops: list[int] = []
    if isinstance(tokenizer, str | Path):
        folder = Path(tokenizer)
        folder_stops = generation_stop_ids(folder)
        if preprocessor is None and (folder / "preprocessor_config.json").is_file():
            preprocessor = PreprocessConfig.from_file(folder)
        tokenizer = Tokenizer.from_dir(folder)
    preprocessor = preprocessor or PreprocessConfig.default()
    vision = model.vision_config
    if vision is not None and (preprocessor.patch_size, (preprocessor.merge_kernel_size,) * 2) != (
        vision.patch_size, vision.merge_kernel_size
    ):
        raise ValueError(
            f"the preprocessor's patch_size {preprocessor.patch_size} / merge_kernel_size "
            f"{preprocessor.merge_kernel_size} do not match the vision tower's {vision.patch_size} / "
            f"{vision.merge_kernel_size}"
        )
    thinking = mode == "thinking"
    template = chat_template or (tokenizer.chat_template if tokenizer is not None else None)
    encoded = [_encode_prompt(i, p, tokenizer, template, tools, thinking, preprocessor) for i, p in enumerate(prompts)]
    prompt_ids, media = _attach_media(model, encoded, pixel_values, grid_thws)
    check_prompts(prompt_ids, model.config.text.vocab_size)

    defaults = RECOMMENDED_SAMPLING[mode]
    sampling = Sampling(
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=top_k,
    )
    stops = set(stop_ids) | set(folder_stops)
    if tokenizer is not None:
        stops.update(tokenizer.stop_ids)
    else:
        stops.update(model.config.eos_token_ids)

    longest = max(map(len, prompt_ids))
    context = model.config.text.max_position_embeddings
    if engine is not None:
        if engine.model is not model:
            raise ValueError("engine= was built for another model: build it with Engine(model, ...)")
        cache_length = engine.max_length
    elif cache_length is None:
        wanted = longest + max_new_tokens
        cache_length = min(-(-wanted // CACHE_ROUNDING) * CACHE_ROUNDING, context)
    for i, ids in enumerate(prompt_ids):
        if len(ids) > min(cache_length, context):
            limit = (f"the model's context (max_position_embeddings = {context})" if cache_length >= context
                     else f"the cache ({cache_length} tokens)")
            raise ValueError(f"prompt {i} has {len(ids)} tokens: longer than {limit}")
    if engine is None:
        engine = Engine(model, max_slots=len(prompt_ids), max_length=cache_length, prefill_chunk=prefill_chunk,
                        cache_dtype=cache_dtype)
    requests = [
        engine.submit(
            ids, max_new_tokens=max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, seed=seed + i, stop_ids=sorted(stops),
            on_token=None if on_token is None else functools.partial(on_token, i),
            pixel_values=None if m is None else m[0], grid_thws=None if m is None else m[1],
        )
        for i, (ids, m) in enumerate(zip(prompt_ids, media, strict=True))
    ]
    engine.run()
    encoded_ids = prompt_ids
    outputs = [r.token_ids for r in requests]

    results = []
    for prompt, ids, out in zip(encoded, encoded_ids, outputs, strict=True):
        stopped = out[-1] in stops
        result = GenerationResult(ids, out, "stop" if stopped else "length")
        if tokenizer is not None:
            result.text = tokenizer.decode(out[:-1] if stopped else out)
            if prompt.is_chat:
                result.parsed = parse_output(result.text, thinking=thinking, tools=tools)
                result.tool_ids = prompt.tool_ids
        results.append(result)
    return results
