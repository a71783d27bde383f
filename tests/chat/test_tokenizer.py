"""The tiktoken tokenizer: a tiny synthetic rank file, and the real special-token table."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from kimi_jax.chat.tokenizer import (
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    Tokenizer,
    special_tokens_from_config,
    split_long_input,
)
from kimi_jax.config.model import builtin_config_dir

FIX = Path(__file__).parents[1] / "fixtures" / "chat"
REAL_BASE = 163584

# Merges on top of the 256 byte ranks: digits, "the", and the UTF-8 bytes of 你 (e4 bd a0).
MERGES = [b"12", b"34", b"1234", b"th", b"the", b"\xe4\xbd", b"\xe4\xbd\xa0"]
BASE = 256 + len(MERGES)
RANK = {tok: 256 + i for i, tok in enumerate(MERGES)}


def real_config() -> dict:
    return json.loads((builtin_config_dir() / "tokenizer_config.json").read_text())


def shifted_config(base: int) -> dict:
    """The real tokenizer_config.json with its special ids moved to start at ``base``."""
    config = real_config()
    config["added_tokens_decoder"] = {
        str(int(k) - REAL_BASE + base): v for k, v in config["added_tokens_decoder"].items()
    }
    return config


def write_tokenizer_dir(path: Path, config: dict | None = None) -> Path:
    ranks = [bytes([i]) for i in range(256)] + MERGES
    (path / "tiktoken.model").write_text(
        "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(ranks))
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config or shifted_config(BASE)))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(write_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((FIX / "tokenizer_special_tokens.json").read_text())


@pytest.mark.parametrize("text", [
    "Hello, world! It's a test; they'll SEE.",
    "你好世界，这是中文。混合 English 文本",
    "emoji 😀👍🏽 and ZWJ 👩‍👩‍👧 family",
    "numbers 1 12 123 1234 12345 3.14159 -42",
    "tabs\t\tand   spaces   \n\n\n  newlines \r\n end  ",
    "   ",
    "",
    "the theme of the thesis",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.num_base_tokens for i in ids)
    assert tok.decode(ids) == text


def test_merges_apply_within_pretokens(tok):
    assert tok.encode("the") == [RANK[b"the"]]
    assert tok.encode("你") == [RANK[b"\xe4\xbd\xa0"]]
    # digits are pre-tokenized in groups of at most three: "1234" -> "123" + "4", so the
    # "1234" merge (reachable from "12" + "34") never happens
    assert tok.encode("1234") == [RANK[b"12"], ord("3"), ord("4")]
    assert tok.encode("341234") == [RANK[b"34"], ord("1"), ord("2"), RANK[b"34"]]  # "341" + "234"


def test_special_tokens_encode_to_single_ids(tok):
    for token, token_id in tok.special_tokens.items():
        assert tok.encode(token) == [token_id]
        assert tok.decode([token_id]) == token
        assert tok.token_to_id(token) == token_id
        assert tok.id_to_token(token_id) == token
    text = "<|im_user|>user<|im_middle|>hi<think></think><|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.im_user_id and ids[-1] == tok.im_end_id
    assert [tok.think_id, tok.think_end_id] == ids[-3:-1]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "userhi"


def test_allow_special_false_encodes_markers_as_text(tok):
    text = "a<|im_end|>b"
    ids = tok.encode(text, allow_special=False)
    assert all(i < tok.num_base_tokens for i in ids)
    assert tok.decode(ids) == text


def test_named_ids_follow_the_base_ranks(tok):
    assert tok.vocab_size == BASE + 256
    named = {
        "bos_id": 0, "eos_id": 1, "im_end_id": 2, "im_user_id": 3, "im_assistant_id": 4,
        "im_system_id": 10, "tool_calls_section_begin_id": 11, "tool_calls_section_end_id": 12,
        "tool_call_begin_id": 13, "tool_call_argument_begin_id": 14, "tool_call_end_id": 15,
        "im_middle_id": 17, "media_begin_id": 18, "media_content_id": 19, "media_end_id": 20,
        "media_pad_id": 21, "think_id": 22, "think_end_id": 23, "unk_id": 254, "pad_id": 255,
    }
    assert {name: getattr(tok, name) - BASE for name in named} == named
    assert tok.stop_ids == (tok.im_end_id, tok.eos_id)
    assert tok.id_to_token(BASE + 5) == f"<|reserved_token_{BASE + 5}|>"


def test_byte_level_token_strings(tok):
    assert tok.id_to_token(ord(" ")) == "Ġ"
    assert tok.id_to_token(RANK[b"the"]) == "the"
    assert tok.token_to_id("Ġ") == ord(" ")
    assert tok.token_to_id(tok.id_to_token(RANK[b"\xe4\xbd\xa0"])) == RANK[b"\xe4\xbd\xa0"]
    with pytest.raises(KeyError, match="not a token"):
        tok.token_to_id("no such token")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_split_long_input():
    assert [len(p) for p in split_long_input("a" * (2 * MAX_RUN_CHARS + 7))] == [MAX_RUN_CHARS, MAX_RUN_CHARS, 7]
    spaced = "ab " * 10
    assert list(split_long_input(spaced)) == [spaced]
    mixed = " " * (MAX_RUN_CHARS + 1) + "x"
    assert list(split_long_input(mixed)) == [" " * MAX_RUN_CHARS, " x"]
    long = "word " * (MAX_ENCODE_CHARS // 5 + 1000)
    pieces = list(split_long_input(long))
    assert [len(p) for p in pieces] == [MAX_ENCODE_CHARS, len(long) - MAX_ENCODE_CHARS]
    assert list(split_long_input("")) == []


def test_long_runs_round_trip(tok):
    text = "x" * (MAX_RUN_CHARS + 10) + " " * (MAX_RUN_CHARS + 3) + "你好" * 100
    assert tok.decode(tok.encode(text)) == text


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        Tokenizer.from_dir(tmp_path)
    write_tokenizer_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_special_ids_must_follow_the_ranks(tmp_path):
    # the real config (specials at 163584+) does not fit a rank file of BASE tokens
    write_tokenizer_dir(tmp_path, real_config())
    with pytest.raises(ValueError, match="outside the special range"):
        Tokenizer.from_dir(tmp_path)


def test_bad_rank_file(tmp_path):
    write_tokenizer_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(ValueError, match="ranks are not exactly"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("not-base64!! 0\n")
    with pytest.raises(ValueError, match=r"tiktoken.model: not a tiktoken rank file: .*not-base64"):
        Tokenizer.from_dir(tmp_path)


def test_real_special_table_matches_reference(golden):
    table = special_tokens_from_config(real_config(), golden["num_base_tokens"])
    assert {i: s for s, i in table.items()} == {e["id"]: e["token"] for e in golden["special_tokens"]}
    for key in ("bos", "eos", "pad", "unk"):
        assert table[real_config()[f"{key}_token"]] == golden[f"{key}_id"]


def test_real_sized_vocabulary(golden):
    """Real ids for strings made of special tokens, on a stand-in rank table of the real size."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({(0x10000 + j).to_bytes(3, "big"): 256 + j for j in range(REAL_BASE - 256)})
    tok = Tokenizer(ranks, special_tokens_from_config(real_config(), REAL_BASE))
    assert tok.vocab_size == 163840
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == tuple(golden[f"{k}_id"] for k in ("bos", "eos", "pad", "unk"))
    assert (tok.im_end_id, tok.im_middle_id, tok.media_pad_id, tok.think_end_id) == (163586, 163601, 163605, 163607)
    for text, ids in golden["special_only_strings"].items():
        assert tok.encode(text) == ids
