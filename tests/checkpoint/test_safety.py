"""Checkpoints and paths, tried as a new user would: what --overwrite may replace, relative
paths and ``~``, folders a killed conversion leaves, checksums and ``verify``, damaged array
files, index entries outside the source folder, unwritable destinations, bad metadata."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import kimi_jax
from kimi_jax.checkpoint import destination
from kimi_jax.checkpoint.convert import ocp
from kimi_jax.checkpoint.load import checkpoint_info
from kimi_jax.cli.main import main
from kimi_jax.testing.synthetic import k25_config, write_checkpoint

TEXT = dict(vocab_size=96, hidden_size=40, intermediate_size=72, moe_intermediate_size=20,
            num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24, kv_lora_rank=12,
            qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10, n_routed_experts=6,
            num_experts_per_tok=2)


@pytest.fixture
def hf(tmp_path):
    """A small sharded text-only K2.5-layout checkpoint (float32 values)."""
    return write_checkpoint(tmp_path / "hf", k25_config(TEXT, multimodal=False), seed=1, dtype="float32", shards=2)


@pytest.fixture
def converted(hf, tmp_path):
    """``hf`` converted to float32 (its random values do not compress, so bytes are stored as they are)."""
    return kimi_jax.convert(hf, tmp_path / "ck", dtype="float32", progress=False)


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def data_files(ck: Path) -> list[Path]:
    """The array data files of a converted checkpoint, largest first."""
    files = [p for p in (ck / "params").rglob("d/*") if p.is_file() and "ocdbt.process_" in str(p)]
    return sorted(files, key=lambda p: (-p.stat().st_size, str(p)))


# ------------------------------------------------------------------------ --overwrite


def test_overwrite_refuses_a_folder_of_user_files(hf, tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    (mine / "sub" / "data.bin").write_bytes(b"\x00" * 10)
    before = listing(mine)
    with pytest.raises(FileExistsError, match=rf"{mine} is not a kimi-jax checkpoint .* notes.txt, sub"):
        kimi_jax.convert(hf, mine, overwrite=True, progress=False)
    assert listing(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mine"]


def test_overwrite_refuses_the_source_itself(hf):
    before = listing(hf)
    with pytest.raises(ValueError, match=rf"destination {hf} is the source folder itself"):
        kimi_jax.convert(hf, hf, overwrite=True, progress=False)
    assert listing(hf) == before


def test_overwrite_refuses_the_sources_parent(tmp_path):
    work = tmp_path / "work"
    src = write_checkpoint(work / "hf", k25_config(TEXT, multimodal=False), seed=1, dtype="float32")
    before = listing(work)
    with pytest.raises(ValueError, match=rf"source folder {src} is inside the destination {work}"):
        kimi_jax.convert(src, work, overwrite=True, progress=False)
    # through a symlink to the parent too
    (tmp_path / "link").symlink_to(work)
    with pytest.raises(ValueError, match="is inside the destination"):
        kimi_jax.convert(src, tmp_path / "link", overwrite=True, progress=False)
    assert listing(work) == before


def test_destination_inside_the_source_is_refused(hf):
    with pytest.raises(ValueError, match=rf"destination {hf / 'out'} is inside the source folder {hf}"):
        kimi_jax.convert(hf, hf / "out", progress=False)
    assert not (hf / "out").exists()


def test_destination_is_a_file(hf, tmp_path):
    f = tmp_path / "ck"
    f.write_text("a file")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"the destination {f} is a file, not a folder"):
            kimi_jax.convert(hf, f, overwrite=overwrite, progress=False)
    with pytest.raises(FileExistsError, match=f"{f} is a file, so no folder"):
        kimi_jax.convert(hf, f / "sub", progress=False)
    assert f.read_text() == "a file"


def test_overwrite_replaces_a_checkpoint_and_an_empty_folder(hf, converted, tmp_path):
    kimi_jax.convert(hf, converted, overwrite=True, progress=False)
    assert checkpoint_info(converted)["dtype"] == "bfloat16"
    empty = tmp_path / "empty"
    empty.mkdir()
    kimi_jax.convert(hf, empty, overwrite=True, progress=False)
    assert checkpoint_info(empty)["dtype"] == "bfloat16"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left
    assert not (converted / destination.MARKER).exists()


def test_overwrite_refuses_a_checkpoint_holding_user_files(hf, converted):
    (converted / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"also holds files the converter did not write \(notes.txt\)"):
        kimi_jax.convert(hf, converted, overwrite=True, progress=False)
    assert (converted / "notes.txt").read_text() == "mine"


def test_failed_overwrite_keeps_the_old_checkpoint(hf, converted, monkeypatch):
    """A failure while writing, or while swapping the new checkpoint in, leaves the old one whole."""
    before = listing(converted)
    real_save = ocp.partial.save
    calls = []

    def flaky_save(path, tree):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk on fire")
        return real_save(path, tree)

    monkeypatch.setattr(ocp.partial, "save", flaky_save)
    with pytest.raises(OSError, match="disk on fire"):
        kimi_jax.convert(hf, converted, overwrite=True, progress=False)
    monkeypatch.undo()
    assert listing(converted) == before

    real_rename = os.rename

    def rename(a, b):
        if Path(a).name.startswith(".ck.tmp-"):  # the new checkpoint moving in
            raise OSError("rename failed")
        return real_rename(a, b)

    monkeypatch.setattr(destination.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        kimi_jax.convert(hf, converted, overwrite=True, progress=False)
    monkeypatch.undo()
    assert listing(converted) == before
    assert sorted(p.name for p in converted.parent.iterdir()) == ["ck", "hf"]
    kimi_jax.verify(converted)


# -------------------------------------------------------------------------- paths


def test_relative_paths_and_home(hf, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ck = kimi_jax.convert("hf", "ck", progress=False)
    assert ck == tmp_path / "ck"
    assert checkpoint_info("ck")["dtype"] == "bfloat16"
    assert kimi_jax.verify("ck").ok
    model = kimi_jax.load("ck", verify=True)
    assert model(np.zeros((1, 3), np.int32)).shape == (1, 3, 96)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert kimi_jax.convert("~/hf", "~/home_ck", progress=False) == tmp_path / "home_ck"
    kimi_jax.load("~/home_ck")
    assert main(["convert", "hf", "cli_ck", "--quiet"]) == 0
    assert main(["convert", "~/hf", "~/cli_ck", "--quiet", "--overwrite"]) == 0
    assert main(["info", "cli_ck"]) == 0
    assert main(["info", "~/cli_ck"]) == 0
    assert main(["verify", "cli_ck", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint      kimi-jax: bfloat16" in out and "OK: " in out


def test_demo_with_a_relative_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--dir", "work"]) == 0
    assert (tmp_path / "work" / "converted" / "kimi_jax.json").is_file()
    assert f"converting it to {tmp_path / 'work' / 'converted'}" in capsys.readouterr().out


# --------------------------------------------------------------- killed conversions


KILLED = textwrap.dedent("""
    import os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    import kimi_jax
    from kimi_jax.checkpoint.convert import ocp

    real_save, calls = ocp.partial.save, []

    def save(path, tree):
        calls.append(path)
        if len(calls) == 3:  # mid-conversion: tell the test, then wait to be killed
            open(sys.argv[3], "w").close()
            time.sleep(600)
        return real_save(path, tree)

    ocp.partial.save = save
    kimi_jax.convert(sys.argv[1], sys.argv[2], progress=False)
""")


def test_sigkilled_conversion_is_cleaned_up_by_the_next(hf, tmp_path, capsys):
    script, flag = tmp_path / "convert.py", tmp_path / "writing"
    script.write_text(KILLED)
    proc = subprocess.Popen([sys.executable, str(script), str(hf), str(tmp_path / "ck"), str(flag)])
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None, "the conversion ended before it was killed"
            assert time.monotonic() < deadline, "the conversion did not start writing"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".ck.tmp-")]
    assert (left / destination.MARKER).is_file()
    assert any(p.is_dir() for p in left.iterdir())  # Orbax's partly written arrays
    unmarked = tmp_path / ".ck.tmp-0000user"  # not the converter's: kept
    unmarked.mkdir()
    kimi_jax.convert(hf, tmp_path / "ck", progress=False)
    assert f"removing an unfinished conversion left at {left}" in capsys.readouterr().err
    assert not left.exists() and unmarked.is_dir()
    kimi_jax.verify(tmp_path / "ck")


def test_leftover_of_a_running_conversion_is_kept(hf, tmp_path, capsys):
    other = subprocess.Popen(["sleep", "60"])
    try:
        left = tmp_path / ".ck.tmp-12345678"
        left.mkdir()
        destination.mark(left, tmp_path / "ck")
        info = json.loads((left / destination.MARKER).read_text())
        (left / destination.MARKER).write_text(json.dumps({**info, "pid": other.pid}))
        kimi_jax.convert(hf, tmp_path / "ck", progress=False)
        assert f"leaving {left}: a conversion (pid {other.pid}) is still writing it" in capsys.readouterr().err
        assert left.is_dir()
    finally:
        other.kill()
        other.wait()
    kimi_jax.convert(hf, tmp_path / "ck", overwrite=True, progress=False)  # that process is gone now
    assert not left.exists()


# ---------------------------------------------------------------------- integrity


def test_checksums_recorded_and_verified(converted, capsys):
    info = checkpoint_info(converted)
    assert info["checksums"] == {"algorithm": "sha256", "file": "checksums.json"}
    arrays = json.loads((converted / "checksums.json").read_text())["arrays"]
    assert "language_model/embed_tokens" in arrays and "language_model/layers/1/mlp/experts/gate_proj" in arrays
    assert arrays["language_model/embed_tokens"]["shape"] == [96, 40]
    report = kimi_jax.verify(converted)
    assert report.ok and report.checked == len(arrays)
    assert main(["verify", str(converted), "--quiet"]) == 0
    assert "OK: " in capsys.readouterr().out


def test_int4_experts_verify(fixtures, tmp_path):
    ck = kimi_jax.convert(fixtures / "golden" / "text_e8_int4", tmp_path / "int4", progress=False)
    arrays = json.loads((ck / "checksums.json").read_text())["arrays"]
    assert arrays["language_model/layers/1/mlp/experts/gate_proj/q"]["dtype"] == "uint32"  # the words of eight int4 values
    assert kimi_jax.verify(ck).ok


def test_flipped_bytes_are_found(converted, capsys):
    victim = data_files(converted)[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one byte: one array's (a span of bytes may cross into the next array's)
    victim.write_bytes(bytes(data))
    relative = str(victim.relative_to(converted))
    with pytest.raises(kimi_jax.ChecksumError) as e:
        kimi_jax.verify(converted)
    [bad] = e.value.report.bad
    assert bad.name.startswith("language_model/") and relative in bad.files
    assert f"{bad.name}: " in str(e.value) and relative in str(e.value)
    with pytest.raises(kimi_jax.ChecksumError, match=bad.name):
        kimi_jax.load(converted, verify=True)
    assert main(["verify", str(converted), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert bad.name in captured.out and relative in captured.out
    assert f"1 of {e.value.report.checked} arrays are bad: {bad.name}" in captured.err


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_missing_or_truncated_array_file_is_one_line(converted, damage, capsys):
    victim = data_files(converted)[0]
    relative = str(victim.relative_to(converted))
    if damage == "delete":
        victim.unlink()
    else:
        os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(ValueError) as e:
        kimi_jax.load(converted)
    message = str(e.value)
    assert "\n" not in message and len(message) < 600, message
    assert "cannot read array language_model/" in message and relative in message
    assert e.value.__cause__ is None and e.value.__context__ is None  # no chained orbax traceback
    with pytest.raises(kimi_jax.ChecksumError, match=f"cannot be read.*{relative}"):
        kimi_jax.verify(converted)
    assert main(["verify", str(converted), "--quiet"]) == 2
    assert relative in capsys.readouterr().out


def test_checkpoint_without_checksums(converted, capsys):
    """Converted by an older kimi-jax: verify says so, never passes silently."""
    info = json.loads((converted / "kimi_jax.json").read_text())
    del info["checksums"]
    (converted / "kimi_jax.json").write_text(json.dumps(info))
    (converted / "checksums.json").unlink()
    with pytest.raises(ValueError, match=r"no checksums recorded \(converted by an older kimi-jax\); re-convert"):
        kimi_jax.verify(converted)
    with pytest.raises(ValueError, match="no checksums recorded"):
        kimi_jax.load(converted, verify=True)
    kimi_jax.load(converted)  # still loads without verify
    assert main(["verify", str(converted)]) == 2
    assert "no checksums recorded" in capsys.readouterr().err


def test_checksum_file_missing(converted):
    (converted / "checksums.json").unlink()
    with pytest.raises(ValueError, match="checksums.json is missing"):
        kimi_jax.verify(converted)


# -------------------------------------------------------------------- source index


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/data/outside.safetensors", "sub/../../x.safetensors"])
def test_index_entries_must_stay_inside_the_source(hf, tmp_path, entry):
    index = hf / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = sorted(data["weight_map"])[0]
    data["weight_map"][name] = entry
    index.write_text(json.dumps(data))
    with pytest.raises(kimi_jax.ConversionError, match=rf"entry for tensor {name} names '{entry}', which is not a "
                                                       "file inside the checkpoint folder"):
        kimi_jax.convert(hf, tmp_path / "out", progress=False)


# ----------------------------------------------------------- errors from libraries


def test_read_only_destination(hf, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    monkeypatch.setattr(destination.os, "access", lambda path, mode: Path(path) != parent)
    with pytest.raises(PermissionError, match=f"cannot write to {parent} .permission denied., so cannot create"):
        kimi_jax.convert(hf, parent / "ck", progress=False)
    monkeypatch.undo()

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(PermissionError, match=f"cannot write to {parent} .permission denied.$"):
        kimi_jax.convert(hf, parent / "ck", progress=False)
    monkeypatch.undo()
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_destination_for_real(hf, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=f"cannot write to {parent}"):
            kimi_jax.convert(hf, parent / "ck", progress=False)
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "float8", "unknown dtype 'float8'"),
    ("expert_format", "int3", "unknown expert_format 'int3'"),
])
def test_bad_metadata(converted, field, value, message):
    info_file = converted / "kimi_jax.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, field: value}))
    with pytest.raises(ValueError, match=f"{info_file}: {message}"):
        kimi_jax.load(converted)
    info_file.write_text("{not json")
    with pytest.raises(ValueError, match=f"{info_file} cannot be read"):
        checkpoint_info(converted)


def test_interrupted_swap_restores_the_old_checkpoint(hf, converted, capsys):
    """Killed between the swap's two renames: the old checkpoint, set aside, comes back."""
    aside = converted.parent / f".{converted.name}.old-12345678"
    os.rename(converted, aside)
    destination.mark(aside, converted)
    kimi_jax.convert(hf, converted, overwrite=True, progress=False)
    assert f"restored {converted}" in capsys.readouterr().err
    assert not aside.exists() and checkpoint_info(converted)


def test_leftover_written_from_another_host_is_kept(hf, tmp_path, capsys):
    """On a shared file system a conversion on another host cannot be checked: its folder stays."""
    dst = tmp_path / "ck"
    left = tmp_path / ".ck.tmp-abcdef12"
    left.mkdir()
    (left / destination.MARKER).write_text(json.dumps({"pid": 1, "host": "another-host", "time": 0}))
    kimi_jax.convert(hf, dst, progress=False)
    assert "a conversion on host another-host" in capsys.readouterr().err
    assert left.is_dir() and checkpoint_info(dst)
