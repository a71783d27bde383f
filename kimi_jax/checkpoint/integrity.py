"""Checksums of a converted checkpoint's arrays, and reading the arrays back to check them.

The converter records a SHA-256 of every array's values as it writes them (``checksums.json``,
named by ``kimi_jax.json``): the bytes of the array in C order, int4 values widened to one
int8 each. :func:`verify` reads the arrays back one at a time (in slabs of whole storage
chunks along the leading axis: the converter writes each array as one chunk, so host memory
holds about the largest array), and names each array whose values or files are bad, with
the files under ``params/`` that hold it.

Orbax stores the arrays in an OCDBT database (``params/state``): each array's chunks are
values in files ``ocdbt.process_*/d/*`` (small ones inline in the database's index nodes).
:func:`array_files` maps arrays to those files, so errors name the file that is damaged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "sha256"
SLAB_BYTES = 1 << 26
"""Bytes of one array hashed (and, where its storage chunks allow, read) at a time."""
_WIDEN = {np.dtype(ml_dtypes.int4): np.int8, np.dtype(ml_dtypes.uint4): np.uint8}
_STATUS = re.compile(r"\b([A-Z_]{4,}): (.*)", re.S)
_CHUNK_KEY = re.compile(r'"([^"/]+)/c(?:/[0-9]+)*"')


class ChecksumError(ValueError):
    """Arrays of a checkpoint are damaged or missing; ``report`` names each one and its files."""

    def __init__(self, report: VerifyReport):
        super().__init__(str(report))
        self.report = report


@dataclasses.dataclass(frozen=True)
class BadArray:
    name: str  # path in the parameter tree, "/"-joined
    files: tuple[str, ...]  # files (relative to the checkpoint folder) holding it
    problem: str

    def __str__(self) -> str:
        where = ", ".join(self.files) if self.files else "no file"
        return f"{self.name}: {self.problem} (in {where})"


@dataclasses.dataclass
class VerifyReport:
    path: Path
    checked: int
    bad: list[BadArray]

    @property
    def ok(self) -> bool:
        return not self.bad

    def __str__(self) -> str:
        if self.ok:
            return f"{self.path}: all {self.checked} arrays match their checksums"
        lines = [f"{self.path}: {len(self.bad)} of {self.checked} arrays are bad:"]
        lines += [f"  {b}" for b in self.bad]
        lines.append("convert the Hugging Face checkpoint again (kimi-jax convert SRC DST --overwrite)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- hashing


def slabs(shape: tuple[int, ...], itemsize: int, rows: int = 1) -> Iterator[tuple]:
    """Index tuples covering an array in slabs of its leading axis of about :data:`SLAB_BYTES`
    (a multiple of ``rows``: whole storage chunks, which are read whole anyway)."""
    if not shape:
        yield ()
        return
    row = max(1, math.prod(shape[1:]) * itemsize)
    step = max(1, SLAB_BYTES // (row * rows)) * rows
    for start in range(0, shape[0], step):
        yield (slice(start, min(start + step, shape[0])),)
    if shape[0] == 0:
        yield (slice(0, 0),)


def update(h, values: np.ndarray) -> None:
    """Adds ``values`` to the hash ``h`` in the canonical byte form (C order, int4 as int8)."""
    widen = _WIDEN.get(values.dtype)
    if widen is not None:
        values = values.astype(widen)
    h.update(np.ascontiguousarray(values).reshape(-1).view(np.uint8))


def array_checksum(a: np.ndarray) -> dict:
    """The record of one array: its digest, dtype and shape."""
    h = hashlib.new(ALGORITHM)
    for s in slabs(a.shape, a.dtype.itemsize):
        update(h, a[s])
    return {ALGORITHM: h.hexdigest(), "dtype": str(a.dtype), "shape": list(a.shape)}


def storage_key(name: str) -> str:
    """Orbax's key of the array at tree path ``name`` ("/"-joined): the path "."-joined."""
    return name.replace("/", ".")


# --------------------------------------------------------------------------- storage


def database(params: Path) -> Path:
    """The OCDBT database folder under ``params/`` (Orbax writes it to ``params/state``)."""
    for folder in (params / "state", params):
        if (folder / "manifest.ocdbt").is_file():
            return folder
    candidates = sorted(p.parent for p in params.glob("*/manifest.ocdbt"))
    if candidates:
        return candidates[0]
    raise ValueError(f"{params} holds no Orbax array database (no manifest.ocdbt): the checkpoint is damaged")


def array_files(params: Path) -> dict[str, set[str]]:
    """Storage key of each chunk (``"a.b.c/c/0/0"``) -> data files holding it, relative to the
    checkpoint folder (``params``' parent). Empty if the database index cannot be read."""
    import tensorstore as ts

    try:
        db = database(params)
        base = ts.KvStore.open(f"file://{db}/").result()
        manifest = ts.ocdbt.dump(base).result()
    except Exception:  # noqa: BLE001 - the files are only named to help; errors come from the reads
        return {}
    prefix = db.relative_to(params.parent)
    out: dict[str, set[str]] = {}

    def data_file(location: str) -> str:
        # "value:<subfolder>/:d/<name>:<offset>:<length>" or "btreenode:<subfolder>:d/<name>:<offset>:<length>"
        parts = location.split(":")
        return str(prefix / (parts[1] + parts[2]))

    def walk(location: str) -> None:
        node = ts.ocdbt.dump(base, location).result()
        for entry in node.get("entries", []):
            key = entry.get("key", b"")
            key = key.decode() if isinstance(key, bytes) else str(key)
            if isinstance(entry.get("indirect_value"), str):
                out.setdefault(key, set()).add(data_file(entry["indirect_value"]))
            elif "inline_value" in entry:
                out.setdefault(key, set()).add(data_file(location))
            for value in entry.values():
                if isinstance(value, str) and value.startswith("btreenode:"):
                    walk(value)
                elif isinstance(value, dict) and isinstance(value.get("location"), str):
                    walk(value["location"])

    try:
        versions = manifest.get("versions") or []
        if versions:
            walk(versions[-1]["root"]["location"])
    except Exception:  # noqa: BLE001
        return out
    return out


def files_of(files: dict[str, set[str]], key: str) -> tuple[str, ...]:
    """Data files of every chunk of the array stored under ``key``."""
    found = set()
    for k, v in files.items():
        if k.startswith(key + "/c"):
            found |= v
    return tuple(sorted(found))


def tensorstore_status(error: BaseException) -> str | None:
    """The first ``STATUS: message`` line of tensorstore in the chain of ``error``, if any."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        m = _STATUS.search(str(e))
        if m and "Error reading" in m.group(2) or m and m.group(1) in ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE"):
            return f"{m.group(1)}: {m.group(2).strip()}".splitlines()[0]
        e = e.__cause__ or e.__context__
    return None


def read_error(checkpoint: Path, error: BaseException) -> ValueError | None:
    """A one-line ``ValueError`` naming the array and file behind a tensorstore read failure
    (None when ``error`` is not one)."""
    status = tensorstore_status(error)
    if status is None:
        return None
    m = _CHUNK_KEY.search(status)
    params = checkpoint / "params"
    if m:
        key = m.group(1)
        chunk = m.group(0).strip('"')
        files = sorted(array_files(params).get(chunk, ())) or [str(database_or_params(params))]
        status = re.sub(r' in OCDBT database at local file "[^"]*"', "", status)
        missing = [f for f in files if not (checkpoint / f).exists()]
        status = f"the file is missing ({status})" if missing else status
        return ValueError(f"checkpoint {checkpoint}: cannot read array {key.replace('.', '/')} from "
                          f"{', '.join(files)}: {status}; the checkpoint is damaged (`kimi-jax verify` checks "
                          "every array): convert it again")
    return ValueError(f"checkpoint {checkpoint}: cannot read its arrays under params/: {status}; the checkpoint "
                      "is damaged: convert it again")


def database_or_params(params: Path) -> Path:
    try:
        return database(params).relative_to(params.parent)
    except ValueError:
        return Path(params.name)


# ---------------------------------------------------------------------------- verify


def recorded(checkpoint: Path, info: dict) -> dict[str, dict]:
    """The checksums the converter recorded (array name -> record)."""
    entry = info.get("checksums")
    if not entry:
        raise ValueError(f"{checkpoint}: no checksums recorded (converted by an older kimi-jax); re-convert it "
                         "with `kimi-jax convert SRC DST --overwrite` to be able to verify it")
    file = checkpoint / (entry.get("file", CHECKSUMS_FILE) if isinstance(entry, dict) else CHECKSUMS_FILE)
    try:
        data = json.loads(file.read_text())
        arrays = data["arrays"]
        algorithm = data.get("algorithm", ALGORITHM)
    except FileNotFoundError:
        raise ValueError(f"{checkpoint}: {file.name} is missing (kimi_jax.json says checksums were recorded); "
                         "the checkpoint is damaged: convert it again") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file} is not a valid checksum file ({type(e).__name__}: {e})") from None
    if algorithm != ALGORITHM or not isinstance(arrays, dict):
        raise ValueError(f"{file}: unknown checksum algorithm {algorithm!r} (this kimi-jax uses {ALGORITHM})")
    return arrays


def verify(path: str | Path, *, progress: bool = False) -> VerifyReport:
    """Reads every array of the converted checkpoint ``path`` and checks it against the
    checksums recorded at conversion; returns the report when all match, raises
    :class:`ChecksumError` (a ``ValueError``) naming each bad array and its files otherwise,
    and ``ValueError`` for a checkpoint converted without checksums."""
    import tensorstore as ts
    from tqdm.auto import tqdm

    from kimi_jax.checkpoint.load import checkpoint_info

    path = Path(path).expanduser().resolve()
    info = checkpoint_info(path)
    arrays = recorded(path, info)
    params = path / "params"
    db = database(params)
    files = array_files(params)
    context = ts.Context()
    stored_keys = {k.split("/")[0] for k in files}
    bad: list[BadArray] = []
    for name, record in tqdm(sorted(arrays.items()), desc="verifying", unit="array", disable=not progress):
        key = storage_key(name)
        where = files_of(files, key)
        try:
            array = ts.open({"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{db}/",
                                                           "path": key + "/"}},
                            open=True, read=True, context=context).result()
            shape, dtype = tuple(array.shape), np.dtype(array.dtype.numpy_dtype)
            if list(shape) != record["shape"] or str(dtype) != record["dtype"]:
                bad.append(BadArray(name, where, f"stored as {dtype} {list(shape)}, recorded as "
                                                 f"{record['dtype']} {record['shape']}"))
                continue
            h = hashlib.new(ALGORITHM)
            chunk_rows = array.chunk_layout.read_chunk.shape[0] if shape else 1
            for s in slabs(shape, dtype.itemsize, chunk_rows or 1):
                values = array[s].read().result()
                for part in slabs(values.shape, dtype.itemsize):
                    update(h, values[part])
        except Exception as e:  # noqa: BLE001 - every read failure is reported for its array
            if files and key not in stored_keys:
                bad.append(BadArray(name, (), "missing from the checkpoint's array database"))
                continue
            status = tensorstore_status(e) or f"{type(e).__name__}: {e}".splitlines()[0]
            m = _CHUNK_KEY.search(status)
            if m and m.group(0).strip('"') in files:
                where = tuple(sorted(files[m.group(0).strip('"')]))
            status = re.sub(r' in OCDBT database at local file "[^"]*"', "", status)
            if any(not (path / f).exists() for f in where):
                status = f"a file is missing ({status})"
            bad.append(BadArray(name, where, f"cannot be read: {status}"))
            continue
        if h.hexdigest() != record[ALGORITHM]:
            bad.append(BadArray(name, where, "checksum mismatch: its values changed since conversion"))
    for key in sorted(stored_keys - {storage_key(n) for n in arrays}):
        if f"{key}/zarr.json" in files:
            bad.append(BadArray(key.replace(".", "/"), files_of(files, key), "stored but has no recorded checksum"))
    report = VerifyReport(path, len(arrays), bad)
    if bad:
        raise ChecksumError(report)
    return report
