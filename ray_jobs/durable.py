"""Refuse, in one line, output paths that would vanish with a Ray job's temporary working directory.

`ray job submit --working-dir .` uploads the folder and runs the entrypoint in Ray's unpacked copy of it:
`<temp dir>/session_<date>/runtime_resources/working_dir_files/_ray_pkg_<hash>/` (`/tmp/ray` unless the
cluster was started with `--temp-dir`). That copy is a cache entry: when the job ends Ray marks it unused,
and its URI cache deletes unused entries whenever it grows past its limit (10 GB per plugin), besides the
session folder going with the cluster; a new upload (changed files) lands in another `_ray_pkg_*` folder
anyway, and on a multi-node cluster only the node that ran the driver has it. So a relative or default
`--out` (`runs/<name>`), `--storage-path` (`runs/ray`) or tracking URI (`sqlite:///<cwd>/mlflow.db`) would
write the job's results into a folder that nobody will find again and Ray may delete at any time.

Detection is by path, not by the environment Ray gives a job driver (`RAY_JOB_CONFIG_JSON_ENV_VAR`,
`RAY_ADDRESS`): those are set for *every* submitted job, also one without `--working-dir` or with an in-place
`local://` working dir (whose files stay), and for every process the driver starts; they say nothing about
where a relative path lands. The cwd does: it lies under a session's `runtime_resources` folder exactly
when relative paths land in Ray's cache (the folder names are Ray's: `ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME`,
`WorkingDirPlugin`'s `working_dir_files`, `packaging.RAY_PKG_PREFIX`), whatever the temp dir is.

`superweights compare` and any other entrypoint can call `require_durable({"--out": args.out,
"--tracking-uri": args.tracking_uri})` before it writes anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from core.errors import SuperweightsError

RUNTIME_RESOURCES = "runtime_resources"  # ray._private.ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME
SESSION_PREFIX = "session_"  # <temp dir>/session_<date>_<pid>/ (and the session_latest link)
WORKING_DIR_FILES = "working_dir_files"  # ray._private.runtime_env.working_dir.WorkingDirPlugin
# MLflow tracking URIs without a scheme that are not paths.
_BARE_TRACKING_URIS = frozenset({"databricks", "databricks-uc", "uc"})


def _runtime_resources(path: str | Path) -> Path | None:
    """The `<temp dir>/session_*/runtime_resources` folder that `path` (resolved) lies in, if any."""
    p = Path(os.path.realpath(path))
    for parent in (p, *p.parents):
        if parent.name == RUNTIME_RESOURCES and parent.parent.name.startswith(SESSION_PREFIX):
            return parent
    return None


def temporary_working_dir(cwd: str | Path | None = None) -> Path | None:
    """Ray's temporary copy of the working directory that `cwd` (default: this process's) lies in, else None.

    The copy is the `_ray_pkg_<hash>` folder under `working_dir_files`; any other folder of `runtime_resources`
    (another plugin's cache) counts too and is reported as the cwd itself."""
    here = Path(os.path.realpath(cwd if cwd is not None else os.getcwd()))
    resources = _runtime_resources(here)
    if resources is None:
        return None
    rel = here.relative_to(resources).parts
    if len(rel) >= 2 and rel[0] == WORKING_DIR_FILES:
        return resources / rel[0] / rel[1]
    return here


def in_temporary_working_dir() -> bool:
    """True when this process runs in Ray's temporary copy of a job's working directory (see module doc)."""
    return temporary_working_dir() is not None


def _local_path(value: str, tracking: bool) -> str | None:
    """The filesystem path a value names, or None when it names something off this machine (a URI)."""
    if tracking and value in _BARE_TRACKING_URIS:
        return None
    parsed = urlparse(value)
    if parsed.scheme == "sqlite":  # sqlite:///rel.db, sqlite:////abs/x.db, sqlite:///:memory:
        path = value[len("sqlite:///"):] if value.startswith("sqlite:///") else ""
        return path.split("?", 1)[0]
    if parsed.scheme == "file":
        return parsed.path
    if "://" in value:  # s3://, gs://, http(s)://, postgresql://, databricks://profile
        return None
    return value


def _problem(value: str | None, tracking: bool) -> str | None:
    """Why `value` would not outlive the job's working directory ("" = not given; None: it would)."""
    if value is None or not value.strip():
        return ""
    path = _local_path(value.strip(), tracking)
    if path is None:
        return None
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        return f"{value} is relative"
    if _runtime_resources(path) is not None:
        return f"{value} lies in Ray's runtime_resources"
    return None


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def require_durable(paths: dict[str, str | None]) -> None:
    """In Ray's temporary working directory, refuse outputs that would be deleted with it; else do nothing.

    `paths` maps option names to what the user gave (None: the default, which is relative to the cwd):
    `{"--out": args.out, "--storage-path": args.storage_path, "--tracking-uri": args.tracking_uri}`. Absolute
    paths outside Ray's `runtime_resources` and URIs (s3://, gs://, http(s)://, ...) are durable; a missing
    value, a relative path or a sqlite/file URI of one, or anything inside `runtime_resources` is not. Raises
    one single-line SuperweightsError naming every option to set."""
    where = temporary_working_dir()
    if where is None:
        return
    bad = {name: why for name, value in paths.items() if (why := _problem(value, "tracking" in name)) is not None}
    if not bad:
        return
    unset = [name for name, why in bad.items() if not why]
    facts = [f"{_join(unset)} {'was' if len(unset) == 1 else 'were'} not given"] if unset else []
    facts += [f"{name} {why}" for name, why in bad.items() if why]
    hint = "paths every node can reach, e.g. on NFS"
    if any("tracking" in name for name in bad):  # --tracking-uri
        hint += "; a tracking URI as sqlite:////abs/path/mlflow.db or http(s)://server"
    message = (f"this job runs in Ray's temporary copy of the working directory ({where}), which Ray may delete "
               f"any time after the job ends, and {_join(facts)}, so {'it' if len(bad) == 1 else 'they'} would land in it: pass "
               f"absolute {_join(list(bad))} ({hint})")
    raise SuperweightsError(message.replace("\r", " ").replace("\n", " "))  # one line, whatever the values hold
