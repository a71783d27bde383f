"""Kimi's tiktoken tokenizer, read from a checkpoint's ``tiktoken.model`` and ``tokenizer_config.json``.

The BPE itself is tiktoken's. What this module adds is Kimi's format: the pre-tokenization
regex, the 256 special/reserved ids that follow the base ranks (named by the config's
``added_tokens_decoder``, the rest ``<|reserved_token_{id}|>``), and the input splitting of
Moonshot's ``TikTokenTokenizer.encode``, so that ids match the reference.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken.load

from kimi_jax.chat import special
from kimi_jax.chat.template import ChatTemplate
from kimi_jax.chat.tools import check_tools
from kimi_jax.chat.validate import validate_messages

RANK_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"

NUM_SPECIAL_TOKENS = 256
"""Ids ``num_base_tokens .. num_base_tokens + 255`` are special or reserved."""

PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
"""Kimi's pre-tokenization pattern (tiktoken's regex dialect, with ``&&`` class intersection)."""

MAX_ENCODE_CHARS = 400_000
"""Inputs are encoded in pieces of at most this many characters (as Moonshot's tokenizer does)."""

MAX_RUN_CHARS = 25_000
"""Pieces are further cut so no run of whitespace / non-whitespace exceeds this length."""


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken rank file (one ``base64(token) rank`` pair per line) with tiktoken's
    own loader; the ranks must be exactly 0..n-1.

    tiktoken caches files by path; passing the content's hash makes it re-read a file that
    changed since (a cache keyed by path alone would return the old ranks).
    """
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=digest)
    except ValueError as e:
        raise ValueError(f"{path}: not a tiktoken rank file: {e} ({e.__cause__})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}, one per token")
    return ranks


def _token_content(entry: Any) -> str:
    """The string of a token entry in ``tokenizer_config.json`` (a string or an AddedToken dict)."""
    return entry["content"] if isinstance(entry, Mapping) else str(entry)


def special_tokens_from_config(config: Mapping[str, Any], num_base_tokens: int) -> dict[str, int]:
    """The special-token table Moonshot's tokenizer builds: string -> id for all 256 special ids.

    Named ids come from ``config["added_tokens_decoder"]``; unnamed ids in the range become
    ``<|reserved_token_{id}|>``. Needs only the config and the base-rank count, not the ranks.
    """
    special_range = range(num_base_tokens, num_base_tokens + NUM_SPECIAL_TOKENS)
    named: dict[int, str] = {}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        token_id = int(key)
        if token_id not in special_range:
            raise ValueError(
                f"added token {_token_content(entry)!r} has id {token_id}, outside the special range "
                f"[{special_range.start}, {special_range.stop}) that follows {num_base_tokens} base ranks"
            )
        named[token_id] = _token_content(entry)
    table = {named.get(i, f"<|reserved_token_{i}|>"): i for i in special_range}
    if len(table) != NUM_SPECIAL_TOKENS:
        raise ValueError("added_tokens_decoder names two ids with the same string")
    return table


def split_long_input(text: str) -> Iterator[str]:
    """Cut ``text`` the way Moonshot's tokenizer does before calling tiktoken.

    Pieces of at most :data:`MAX_ENCODE_CHARS` characters, each cut further so that no piece
    holds a run of more than :data:`MAX_RUN_CHARS` whitespace or non-whitespace characters.
    """
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        piece = text[start:start + MAX_ENCODE_CHARS]
        run_len = 0
        run_is_space = piece[:1].isspace()
        cut = 0
        for i, ch in enumerate(piece):
            is_space = ch.isspace()
            if is_space != run_is_space:
                run_len, run_is_space = 1, is_space
            else:
                run_len += 1
                if run_len > MAX_RUN_CHARS:
                    yield piece[cut:i]
                    cut, run_len = i, 1
        yield piece[cut:]


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the token strings HF tokenizers show)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_NAMED_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


_PRIVATE_USE = re.compile("[\ue000-\uf8ff]")
_MAX_ESCAPE_DEPTH = 200


def _strings(value: Any, out: list[str], depth: int = 0) -> None:
    """Collect the strings (keys included) of nested mappings / lists / tuples into ``out``."""
    if isinstance(value, str):
        out.append(value)
    elif depth < _MAX_ESCAPE_DEPTH and isinstance(value, Mapping):
        for k, v in value.items():
            _strings(k, out, depth + 1)
            _strings(v, out, depth + 1)
    elif depth < _MAX_ESCAPE_DEPTH and isinstance(value, list | tuple):
        for v in value:
            _strings(v, out, depth + 1)


class _Escaper:
    """Replaces special-token strings inside conversation data by ``S{index}S`` (``S`` a
    private-use character the data does not contain) and restores them after rendering."""

    def __init__(self, pattern: re.Pattern[str], sentinel: str):
        self.pattern = pattern
        self.sentinel = sentinel
        self.table: list[str] = []
        self._restore_re = re.compile(f"{sentinel}(\\d+){sentinel}")
        escaped = f"\\\\u{ord(sentinel):04x}"  # the sentinel as json.dumps(ensure_ascii=True) writes it
        self._restore_json_re = re.compile(f"{escaped}(\\d+){escaped}")

    def _sub(self, match: re.Match[str]) -> str:
        self.table.append(match.group())
        return f"{self.sentinel}{len(self.table) - 1}{self.sentinel}"

    def escape(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.pattern.sub(self._sub, value) if self.pattern.search(value) else value
        if depth >= _MAX_ESCAPE_DEPTH:
            return value
        if isinstance(value, Mapping):
            return {self.escape(k, depth + 1): self.escape(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.escape(v, depth + 1) for v in value]
        if isinstance(value, tuple):
            return tuple(self.escape(v, depth + 1) for v in value)
        return value

    def restore(self, text: str) -> str:
        def original(match: re.Match[str]) -> str:
            index = int(match.group(1))
            return self.table[index] if index < len(self.table) else match.group()

        return self._restore_json_re.sub(original, self._restore_re.sub(original, text))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


class Tokenizer:
    """Kimi's tokenizer: tiktoken BPE plus 256 special ids after the base ranks.

    Token strings (:meth:`id_to_token`, :meth:`token_to_id`) are the special-token strings
    for special ids and GPT-2 byte-level strings for base ranks, as in Moonshot's tokenizer.
    ``chat_template`` renders conversations (:meth:`encode_chat`): a checkpoint folder's own
    template when loaded with :meth:`from_dir`, else the built-in K2.5 renderer.
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: Mapping[str, int],
        *,
        bos_token: str = "[BOS]",
        eos_token: str = "[EOS]",
        pad_token: str = "[PAD]",
        unk_token: str = "[UNK]",
        chat_template: ChatTemplate | None = None,
    ):
        self.num_base_tokens = len(ranks)
        expected = range(self.num_base_tokens, self.num_base_tokens + NUM_SPECIAL_TOKENS)
        if sorted(special_tokens.values()) != list(expected):
            raise ValueError(
                f"special tokens must have exactly the ids {expected.start}..{expected.stop - 1} "
                f"(the {NUM_SPECIAL_TOKENS} ids after {self.num_base_tokens} base ranks)"
            )
        self._special = dict(special_tokens)
        self._special_by_id = {i: s for s, i in self._special.items()}
        self._enc = tiktoken.Encoding("kimi", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self._special)
        self.bos_id = self.special_id(bos_token)
        self.eos_id = self.special_id(eos_token)
        self.pad_id = self.special_id(pad_token)
        self.unk_id = self.special_id(unk_token)
        self.chat_template = chat_template or ChatTemplate()

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tiktoken.model``, ``tokenizer_config.json`` and the chat template
        (:meth:`ChatTemplate.from_dir`) from a checkpoint folder.

        The number of base ranks is the rank file's length; the config's named special ids
        must lie in the 256 ids right after it (163584.. for the real K2.5 files).
        """
        path = Path(path)
        rank_file, config_file = path / RANK_FILE, path / CONFIG_FILE
        for f in (rank_file, config_file):
            if not f.is_file():
                raise FileNotFoundError(f"tokenizer file {f.name} not found in {path}")
        ranks = load_ranks(rank_file)
        config = _read_config(config_file)
        specials = special_tokens_from_config(config, len(ranks))
        named = {key: _token_content(config[key]) for key in _NAMED_TOKEN_KEYS if config.get(key)}
        return cls(ranks, specials, **named, chat_template=ChatTemplate.from_dir(path))

    # ---- encoding and decoding

    def encode_chat(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = True,
        add_generation_prompt: bool = True,
        template: ChatTemplate | None = None,
        postprocess: Callable[[str], str] | None = None,
    ) -> list[int]:
        """Token ids of the prompt for ``messages``, rendered with ``template`` (default:
        :attr:`chat_template`).

        Only the special tokens the template itself writes become special ids. Everything
        the conversation brings is data: special-token strings (``<|im_end|>``, ``<think>``,
        ``[EOS]``, reserved tokens, ...) and ``<|kimi_k25_video_placeholder|>`` typed in
        message content, names, reasoning, tool-call ids and arguments, tool results or tool
        declarations are encoded as the plain text they are, so a message cannot end its own
        turn and open another. Conversations without such strings get exactly the ids of
        ``encode(template.render(...))``. ``postprocess`` edits the rendered text before it
        is encoded (``kimi_jax.generate`` inserts video chunk prompts with it); special-token
        strings it writes are special. To encode a prompt with specials typed by hand, use
        :meth:`encode` (``allow_special=True``).
        """
        template = template or self.chat_template
        messages = messages if isinstance(messages, str | bytes | Mapping) else list(messages)
        validate_messages(messages)
        if tools is not None:
            check_tools(tools)
        strings: list[str] = []
        _strings(messages, strings)
        _strings(tools, strings)
        escaper = None
        if any(self._data_specials_re.search(s) for s in strings):
            used = set(_PRIVATE_USE.findall("".join([*strings, template.source or ""])))
            sentinel = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used)
            escaper = _Escaper(self._data_specials_re, sentinel)
            messages, tools = escaper.escape(messages), escaper.escape(tools)
        text = template.render(messages, tools=tools, thinking=thinking, add_generation_prompt=add_generation_prompt)
        if postprocess is not None:
            text = postprocess(text)
        if escaper is None:
            return self.encode(text, allow_special=True)
        ids: list[int] = []
        for k, piece in enumerate(self._special_split_re.split(text)):
            if k % 2:
                ids.append(self._special[piece])
            elif piece:
                ids.extend(self.encode(escaper.restore(piece), allow_special=False))
        return ids

    @functools.cached_property
    def _special_split_re(self) -> re.Pattern[str]:
        """Splits text at special-token strings (captured), longest first, as tiktoken does."""
        return re.compile("(" + "|".join(map(re.escape, sorted(self._special, key=len, reverse=True))) + ")")

    @functools.cached_property
    def _data_specials_re(self) -> re.Pattern[str]:
        """What conversation data may not bring as markup: special-token strings and the video placeholder."""
        strings = sorted([*self._special, special.VIDEO_PLACEHOLDER], key=len, reverse=True)
        return re.compile("|".join(map(re.escape, strings)))

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        With ``allow_special`` (the default, like Moonshot's tokenizer) special-token strings
        in the text, e.g. ``<|im_end|>``, become their single special ids; without it they
        are encoded as ordinary text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in split_long_input(text):
            if allow_special:
                ids.extend(self._enc.encode(piece, allowed_special="all"))
            else:
                ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD).

        Special ids decode to their strings unless ``skip_special_tokens``, which drops every
        id of the special range (named and reserved).
        """
        ids = self._checked_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base_tokens]
        return self._enc.decode(ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of ``ids`` (special ids as their UTF-8 strings), for incremental detokenizing."""
        return self._enc.decode_bytes(self._checked_ids(ids))

    # ---- vocabulary

    @property
    def vocab_size(self) -> int:
        """Base ranks plus the 256 special ids (163840 for K2.5)."""
        return self.num_base_tokens + NUM_SPECIAL_TOKENS

    @property
    def special_tokens(self) -> dict[str, int]:
        """All 256 special-token strings and their ids."""
        return dict(self._special)

    def special_id(self, token: str) -> int:
        """Id of a special-token string; ``KeyError`` if this tokenizer has no such token."""
        try:
            return self._special[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of this tokenizer") from None

    def _base_token_string(self, token_id: int) -> str:
        table = _byte_to_unicode()
        return "".join(table[b] for b in self._enc.decode_single_token_bytes(token_id))

    @functools.cached_property
    def _base_token_ids(self) -> dict[str, int]:
        return {self._base_token_string(i): i for i in range(self.num_base_tokens)}

    def token_to_id(self, token: str) -> int:
        """Id of a token string (a special-token string or a byte-level base token string)."""
        if token in self._special:
            return self._special[token]
        try:
            return self._base_token_ids[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a token of this vocabulary") from None

    def id_to_token(self, token_id: int) -> str:
        """String of a token id: the special string, or the byte-level string of a base rank."""
        (token_id,) = self._checked_ids([token_id])
        if token_id >= self.num_base_tokens:
            return self._special_by_id[token_id]
        return self._base_token_string(token_id)

    # ---- named ids

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Ids that end an assistant turn: ``<|im_end|>`` and [EOS]."""
        return (self.im_end_id, self.eos_id)

    @property
    def im_end_id(self) -> int:
        return self.special_id(special.IM_END)

    @property
    def im_user_id(self) -> int:
        return self.special_id(special.IM_USER)

    @property
    def im_assistant_id(self) -> int:
        return self.special_id(special.IM_ASSISTANT)

    @property
    def im_system_id(self) -> int:
        return self.special_id(special.IM_SYSTEM)

    @property
    def im_middle_id(self) -> int:
        return self.special_id(special.IM_MIDDLE)

    @property
    def think_id(self) -> int:
        return self.special_id(special.THINK)

    @property
    def think_end_id(self) -> int:
        return self.special_id(special.THINK_END)

    @property
    def media_begin_id(self) -> int:
        return self.special_id(special.MEDIA_BEGIN)

    @property
    def media_content_id(self) -> int:
        return self.special_id(special.MEDIA_CONTENT)

    @property
    def media_end_id(self) -> int:
        return self.special_id(special.MEDIA_END)

    @property
    def media_pad_id(self) -> int:
        return self.special_id(special.MEDIA_PAD)

    @property
    def tool_calls_section_begin_id(self) -> int:
        return self.special_id(special.TOOL_CALLS_SECTION_BEGIN)

    @property
    def tool_calls_section_end_id(self) -> int:
        return self.special_id(special.TOOL_CALLS_SECTION_END)

    @property
    def tool_call_begin_id(self) -> int:
        return self.special_id(special.TOOL_CALL_BEGIN)

    @property
    def tool_call_argument_begin_id(self) -> int:
        return self.special_id(special.TOOL_CALL_ARGUMENT_BEGIN)

    @property
    def tool_call_end_id(self) -> int:
        return self.special_id(special.TOOL_CALL_END)
