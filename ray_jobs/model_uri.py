"""MODEL arguments of `superweights serve` and `evaluate`: a checkpoint folder, a storage URI or an MLflow URI.

* a folder holding weights.safetensors + plan.json + config.json + metrics.json (+ anytime.json);
* that folder on storage: `s3://bucket/prefix/model`, `gs://...`, `file:///abs/path` (what `--out` and
  `ray.storage_path` accept, `ray_jobs.storage_uri`), e.g. a `--out` URI or a checkpoint_epoch_* folder;
* `runs:/<run id>` (the checkpoint files that `superweights train` logs under `checkpoint/`) or
  `runs:/<run id>/<artifact path>`;
* `models:/<name>/<version>` or `models:/<name>@<alias>` (a registered model version whose source is such
  a folder, e.g. registered from `runs:/<run id>/checkpoint`).

MLflow URIs are downloaded with `mlflow.artifacts.download_artifacts` (storage URIs with pyarrow) into a
temporary folder that lives only while the model loads (weights are materialised at load). Every failure is
one `SuperweightsError` line.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from anytime.record import ANYTIME_FILE
from core.errors import SuperweightsError
from ensemble.checkpoint import FILES

from .storage_uri import check_reachable, is_uri, location
from .tracking import check_tracking_uri, default_tracking_uri

SCHEMES = ("runs:/", "models:/")
_RUN_ONLY = re.compile(r"^runs:/+([^/]+)/*$")
_MODEL = re.compile(r"^models:/+(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))(?:/(?P<path>.*))?$")


def is_mlflow_uri(model: str) -> bool:
    return model.startswith(SCHEMES)


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (as `train`). A SQLite
    store must already exist: a fresh one would only be created (slowly) to say the model is not there."""
    uri = check_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise SuperweightsError(f"no MLflow store at {db} (tracking URI {uri}); pass --tracking-uri "
                                    "(the one `superweights train` logged to) or set MLFLOW_TRACKING_URI")
    return uri


def find_checkpoint(root: Path) -> Path:
    """`root` or the single folder below it that holds the checkpoint files."""
    found = sorted({p.parent for p in root.rglob(FILES[1]) if all((p.parent / f).is_file() for f in FILES)})
    if not found:
        have = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[:8]
        raise SuperweightsError(f"no checkpoint ({', '.join(FILES)}) among the downloaded artifacts "
                                f"({', '.join(have) or 'none'})")
    if root in found:
        return root
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found)
        raise SuperweightsError(f"several checkpoints among the artifacts ({names}): name one in the URI, "
                                "e.g. runs:/<run id>/checkpoint")
    return found[0]


def check_uri(model: str) -> None:
    """Refuse a malformed runs:/ or models:/ URI before any store is touched."""
    if model.startswith("models:/") and not _MODEL.match(model):
        raise SuperweightsError(f"malformed model URI {model!r}: use models:/<name>/<version>, models:/<name>/latest "
                                "or models:/<name>@<alias>")
    if model.startswith("runs:/") and not re.match(r"^runs:/+[^/]+", model):
        raise SuperweightsError(f"malformed run URI {model!r}: use runs:/<run id> or runs:/<run id>/<artifact path>")


def model_version_uri(model: str, tracking_uri: str) -> str:
    """Where a registered model version's files are (its download URI, plus a sub-path if given).

    Resolved here with an explicit registry URI: MLflow's own `models:/` download ignores the one passed in
    and falls back to the process-wide default (sqlite:///mlflow.db in the working directory)."""
    from mlflow import MlflowClient

    check_uri(model)
    m = _MODEL.match(model)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, version, alias = m["name"], m["version"], m["alias"]
    if alias is not None:
        version = client.get_model_version_by_alias(name, alias).version
    elif version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise SuperweightsError(f"registered model {name!r} has no versions in {tracking_uri}")
        version = str(max(int(v.version) for v in versions))
    elif not version.isdigit():
        raise SuperweightsError(f"model version {version!r} in {model!r} must be a number, latest or @<alias>")
    uri = client.get_model_version_download_uri(name, version)
    return uri.rstrip("/") + "/" + m["path"] if m["path"] else uri


def download(model: str, tracking_uri: str, dst: Path) -> Path:
    """Download `model` (runs:/..., models:/...) into `dst`; the checkpoint folder inside it."""
    from mlflow.artifacts import download_artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        m = _RUN_ONLY.match(model)
        if m:  # MLflow wants runs:/<id>/<path>; a bare run means all of its artifacts
            download_artifacts(run_id=m.group(1), dst_path=str(dst), tracking_uri=tracking_uri)
        elif model.startswith("models:/"):
            download_artifacts(artifact_uri=model_version_uri(model, tracking_uri), dst_path=str(dst),
                               tracking_uri=tracking_uri)
        else:
            download_artifacts(artifact_uri=model, dst_path=str(dst), tracking_uri=tracking_uri)
    except SuperweightsError:
        raise
    except Exception as e:  # MlflowException, transport and store errors: the user needs one line
        text = " ".join(str(e).split())[:300] or type(e).__name__
        raise SuperweightsError(f"cannot download model {model} from {tracking_uri}: {text}") from None
    return find_checkpoint(dst)


@contextmanager
def resolved_model(model: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """The checkpoint folder of `model`; a downloaded copy is removed when the block ends."""
    if not is_mlflow_uri(model) and not is_uri(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            if model.startswith(("runs:", "models:")):
                raise SuperweightsError(f"unsupported model URI {model!r}: use a checkpoint folder, "
                                        "runs:/<run id>[/path] or models:/<name>/<version>")
            raise SuperweightsError(f"model {model!r} is neither a checkpoint folder nor a storage or MLflow URI "
                                    "(s3://bucket/path, runs:/<run id>, models:/<name>/<version>)")
        yield path
        return
    if is_mlflow_uri(model):
        check_uri(model)
        uri = resolve_tracking_uri(tracking_uri)
    tmp = Path(tempfile.mkdtemp(prefix="superweights-model-"))
    try:
        yield download(model, uri, tmp) if is_mlflow_uri(model) else download_storage(model, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_storage(model: str, dst: Path) -> Path:
    """Copy the model files of the storage folder `model` (s3://, gs://, file://, ...) into `dst`; `dst`.
    Only the model's own files, checked by name and size in one listing: a checkpoint folder's optimizer
    state is not fetched."""
    loc = location(model, "model")
    check_reachable(loc, "model")
    sizes = loc.sizes([*FILES, ANYTIME_FILE])
    missing = [f for f in FILES if sizes[f] is None]
    if missing:
        raise SuperweightsError(f"no model at {model}: {', '.join(missing)} missing (a --out folder or a "
                                "checkpoint_epoch_* folder of `superweights train` holds them)")
    for name, size in sizes.items():
        if size is not None:
            (loc / name).copy_to(location(dst / name))
    return dst
