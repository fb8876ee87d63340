"""Run folders and model folders on a local path or on any filesystem `pyarrow.fs` opens from a URI.

`--storage-path` (`ray.storage_path`) and `--out` take a plain path (local disk, NFS) or a URI that Ray
Train's own storage accepts: `s3://bucket/prefix`, `gs://bucket/prefix`, `file:///abs/path`, ... (Ray Train
resolves a URI with `pyarrow.fs.FileSystem.from_uri` too, so what it accepts is what this module accepts).
Ray Train uploads and downloads the checkpoints of a worker group itself; the driver's own files in the run
folder (the run record, `diverged.txt`, the checkpoints written in-process with 0 workers) and the final
model files copied to `--out` go through a `Location`: one filesystem + path, read and written with the
same calls whether it is a local folder or a bucket, so a `file://` URI in the tests runs the code an
`s3://` one runs.

Only plain files and JSON/safetensors go through here (no pickle); what the files hold is checked where
they are loaded (`ensemble.checkpoint`, `ensemble.train_state`), and a checkpoint counts only when every
file has the size `train_state.json` lists (`is_complete`), as on local disk.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from core.errors import SuperweightsError
from ensemble.train_state import STATE_FILE

CHECKPOINT_PATTERN = "checkpoint_epoch_*"


# `scheme:` at the start (2+ characters: `C:` is a Windows drive). A relative local path with a colon in its first
# part is read as a URI and refused in one line (`./runs:2` says "path"), never silently turned into a folder
# called `<cwd>/s3:` as `Path("s3:/bucket")` would.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def is_uri(value: str | Path) -> bool:
    """A URI for pyarrow (`s3://bucket/prefix`, `file:///abs`, also a mistyped `s3:/bucket`), not a path."""
    text = str(value)
    return bool(_SCHEME.match(text)) or "://" in text  # `://runs`: a URI missing its scheme, refused as one


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Location:
    """A file or folder: `path` on the pyarrow filesystem `fs`; `uri` is how it was named when it is a URI
    (kept for printing and for handing to another process), None for a plain path."""

    fs: Any  # pyarrow.fs.FileSystem
    path: str
    uri: str | None = None

    # -- naming --
    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def local(self) -> Path | None:
        """The local path, for a location given as a plain path (None for a URI, even file://)."""
        return None if self.uri is not None else Path(self.path)

    @property
    def native(self) -> Path | Location:
        """What callers outside get: a `Path` for a plain path (as before URIs were accepted), else itself."""
        return self.local if self.uri is None else self

    def __truediv__(self, name: str) -> Location:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a plain file or folder name: {name!r}")
        uri = None
        if self.uri is not None:
            # The name is percent-encoded: pyarrow decodes URIs (a run named "a b" or "50%" must round-trip),
            # and a query (s3://b/p?region=x) stays at the end, where it belongs.
            base, sep, query = self.uri.partition("?")
            uri = f"{base if base.endswith('/') else base + '/'}{quote(name, safe='')}{sep}{query}"
        return Location(self.fs, posixpath.join(self.path, name), uri)

    def __str__(self) -> str:
        return self.uri if self.uri is not None else self.path

    def __fspath__(self) -> str:
        """Only a plain path is a path of this machine: `open(location)` of an s3:// one must not read a local
        file called `bucket/...`."""
        if self.uri is not None:
            raise TypeError(f"{self.uri} is a URI, not a local path: read it through ray_jobs.storage_uri")
        return self.path

    # -- queries --
    def _info(self):
        return self.fs.get_file_info(self.path)

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.File

    def is_dir(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.Directory

    def folders(self, pattern: str = "*") -> list[Location]:
        """Sub-folders whose name matches `pattern` (fnmatch), sorted by name; none when this one is missing."""
        from pyarrow.fs import FileSelector, FileType

        infos = self.fs.get_file_info(FileSelector(self.path, allow_not_found=True, recursive=False))
        names = sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == FileType.Directory)
        return [self / n for n in names if fnmatch.fnmatchcase(n, pattern)]

    def sizes(self, names) -> dict[str, int | None]:
        """name -> size in bytes of these files in this folder (None: missing or not a file), in one call."""
        from pyarrow.fs import FileType

        names = list(names)
        infos = self.fs.get_file_info([posixpath.join(self.path, n) for n in names])
        return {n: (i.size if i.type == FileType.File else None) for n, i in zip(names, infos, strict=True)}

    # -- reading and writing --
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self):
        return json.loads(self.read_text())

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def write_text(self, text: str) -> None:
        parent = posixpath.dirname(self.path.rstrip("/"))
        if parent:
            self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(text.encode("utf-8"))

    def delete(self) -> None:
        """Delete this file; a missing one is fine."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def copy_to(self, dest: Location) -> None:
        """Copy this file or folder to `dest` (any filesystem, e.g. an s3:// checkpoint to a local --out)."""
        from pyarrow.fs import copy_files

        parent = posixpath.dirname(dest.path.rstrip("/"))
        if parent:
            dest.fs.create_dir(parent, recursive=True)
        # One thread: pyarrow's threaded upload to S3 is unsafe (apache/arrow#32372; Ray Train does the same).
        copy_files(self.path, dest.path, source_filesystem=self.fs, destination_filesystem=dest.fs,
                   use_threads=False)

    def upload(self, folder: Path, last: str = STATE_FILE) -> None:
        """Copy the local `folder`'s entries into this folder, `last` after all the others: a reader that sees
        it knows the rest was copied (`is_complete` also checks every size, for copies cut short)."""
        from pyarrow.fs import LocalFileSystem

        local = LocalFileSystem()
        self.mkdir()
        entries = sorted(Path(folder).iterdir(), key=lambda p: (p.name == last, p.name))
        for entry in entries:
            Location(local, str(entry.absolute())).copy_to(self / entry.name)


def location(value: str | Path | Location, option: str = "path") -> Location:
    """`value` (a plain path, made absolute, `~` expanded, or a URI) as a `Location`. A URI pyarrow cannot
    open (unknown scheme, malformed, a file:// URI that is not absolute, a filesystem missing from this
    pyarrow) is a one-line SuperweightsError that names `option`."""
    from pyarrow.fs import FileSystem, LocalFileSystem

    if isinstance(value, Location):
        return value
    text = str(value)
    if not is_uri(text):
        return Location(LocalFileSystem(), str(Path(text).expanduser().absolute()))
    try:
        fs, path = FileSystem.from_uri(text)
    except OSError as e:  # parsed, but opening it asked the network (an S3 bucket's region) and failed
        raise SuperweightsError(f"cannot reach {option} {text!r}: {_one_line(e)[:300]}") from None
    except (ValueError, TypeError, ImportError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise SuperweightsError(
            f"{option} {text!r} is not a storage URI pyarrow can open ({_one_line(e)[:300]}): use a path, or a URI "
            "such as s3://bucket/prefix, gs://bucket/prefix or file:///absolute/path") from None
    return Location(fs, path.rstrip("/") or path, text)


def check_reachable(loc: Location, option: str) -> None:
    """One request to the filesystem before anything starts: missing credentials, an unknown bucket or a
    refused connection is a one-line error here, not a traceback after the MLflow run began."""
    try:
        loc.fs.get_file_info(loc.path)
    except (OSError, ValueError) as e:
        raise SuperweightsError(f"cannot reach {option} {str(loc)!r}: {_one_line(e)[:300]}") from None


def is_complete(folder: Location) -> bool:
    """`ensemble.train_state.is_complete` on any filesystem: train_state.json is readable and every file it
    lists has the size it was written with."""
    try:
        files = (folder / STATE_FILE).read_json().get("files", {})
        sizes = folder.sizes(files)
    except (OSError, ValueError, AttributeError):
        return False
    return all(sizes[name] == size for name, size in files.items())


def latest_complete(run: Location, pattern: str = CHECKPOINT_PATTERN) -> Location | None:
    """The newest complete checkpoint folder of a run (folder names sort by epoch), or None."""
    try:
        folders = run.folders(pattern)
    except OSError:  # e.g. storage another node cannot see
        return None
    return next((f for f in reversed(folders) if is_complete(f)), None)
