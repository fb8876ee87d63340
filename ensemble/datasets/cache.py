"""The decoded-image cache: one safetensors file + a JSON sidecar per source, verified on every load.

An entry is named by a key over (cache format, Pillow version, the source's digest, the split names, the
decode size), so a changed source, layout or decoder never meets an old entry. The sidecar records the
sha256 and byte count of the safetensors file and every tensor's dtype and shape; a load re-hashes the file
and checks all of it, so a damaged or tampered entry is reported in one line and rebuilt, never used. Writes
go to a temporary file and are renamed into place (sidecar last), under a lock file, so concurrent runs
(data-parallel workers) decode once and never read half an entry. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from core.errors import SuperweightsError

FORMAT = 1
log = logging.getLogger("superweights.data")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "superweights"


def resolve_cache_dir(value: str) -> Path:
    return Path(value).expanduser().absolute() if value else default_cache_dir()


def entry_name(digest: str, splits: tuple[str, str], size: int) -> str:
    from PIL import __version__ as pillow

    key = json.dumps({"format": FORMAT, "pillow": pillow, "source": digest, "splits": list(splits), "size": size},
                     sort_keys=True)
    return "images-" + hashlib.sha256(key.encode()).hexdigest()[:40]


class CacheInvalid(Exception):
    pass


def _check(cond: bool, why: str) -> None:
    if not cond:
        raise CacheInvalid(why)


def _read(folder: Path, name: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(meta, arrays) of a valid entry, None when there is none; CacheInvalid when it is damaged."""
    from safetensors.numpy import load

    meta_path, blob_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        blob = blob_path.read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheInvalid(f"unreadable: {' '.join(str(e).split())}") from None
    _check(isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("name") == name, "wrong sidecar")
    _check(len(blob) == meta.get("bytes"), f"{len(blob)} bytes, the sidecar says {meta.get('bytes')}")
    _check(hashlib.sha256(blob).hexdigest() == meta.get("sha256"), "sha256 differs from the sidecar's")
    try:
        arrays = load(blob)
    except Exception as e:  # safetensors raises its own error types for a malformed header
        raise CacheInvalid(f"not a safetensors file: {' '.join(str(e).split())}") from None
    want = meta.get("tensors")
    got = {k: [str(a.dtype), list(a.shape)] for k, a in arrays.items()}
    _check(got == want, f"tensors {got} differ from the sidecar's {want}")
    return meta, arrays


def load_entry(folder: Path, name: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    try:
        return _read(folder, name)
    except CacheInvalid as e:
        log.warning(f"superweights: warning: decoded-image cache {folder / name}.safetensors is damaged ({e}): "
                    "decoding the images again")
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_entry(folder: Path, name: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Best effort: an unwritable cache folder costs the next run a decode, never this run its data."""
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(a) for k, a in arrays.items()})
    meta = {**meta, "format": FORMAT, "name": name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
            "tensors": {k: [str(a.dtype), list(a.shape)] for k, a in arrays.items()}}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / f"{name}.safetensors", blob)
        _write_atomic(folder / f"{name}.json", json.dumps(meta, indent=1).encode())  # last: marks it complete
    except OSError as e:
        log.warning(f"superweights: warning: cannot write the decoded-image cache in {folder} "
                    f"({' '.join(str(e).split())}): set data.cache_dir to a writable folder")


@contextlib.contextmanager
def locked(folder: Path, name: str) -> Iterator[None]:
    """Exclusive while one process checks or builds an entry; no lock where the folder cannot be made."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / f"{name}.lock", "a+b")  # noqa: SIM115 (held open for the lock's lifetime)
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_cache_dir(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise SuperweightsError(f"data.cache_dir {folder} is a file, not a folder: point it at a folder")
