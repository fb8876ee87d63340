"""One frozen config, sections as dataclasses, loaded from TOML with `--set section.key=value` overrides.

Every field has a default, so `Config()` is a valid (digits) run; unknown keys are rejected with the
list of valid ones. Later issues add sections here (exits, grouping, ray, ...), never elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import SuperweightsError
from core.ssn import GROUP_MODES, UPSAMPLERS


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | cifar10 | cifar100 | fashion-mnist | imagefolder
    # where the files live: cifar*/fashion-mnist folders; imagefolder: a folder or a .tar(.gz) archive of one.
    # A relative path is taken from the current directory (the repo root under `make`).
    root: str = "data"
    download: bool = False  # cifar only: fetch the files when a network exists
    val_fraction: float = 0.15  # of the training pool, stratified, fixed by train.seed
    test_fraction: float = 0.25  # digits only (the other datasets have their own test split)
    train_per_class: int = 0  # keep only N training images per class (0 = all); every dataset
    # every dataset: square side the images are resized to on tensors (area interpolation when shrinking);
    # 0 = native size (an image folder whose images differ in size needs a value)
    image_size: int = 0
    augment: bool = True  # random crop (padding 1/8 of the side) + flip on training batches (never on digits)
    train_split: str = "train"  # imagefolder: folder of the training images, <root>/<train_split>/<class>/*
    test_split: str = "val"  # imagefolder: folder of the test images (CIFAR-10's JPEG tree: "test")
    # imagefolder: decoded images are cached here (safetensors + JSON); "" = $XDG_CACHE_HOME/superweights,
    # else ~/.cache/superweights. Never next to the data, which may be read-only.
    cache_dir: str = ""


@dataclass(frozen=True)
class EnsembleConfig:
    members: tuple[str, ...] = ("wrn-16-4", "wrn-16-2", "wrn-10-4", "wrn-10-2")
    # Early exits (DESIGN.md step 10): "none" (default: members unchanged, one exit = the classifier),
    # "all" (an exit after every stage) or a list of stage indices. The classifier is always the last exit.
    exits: str | tuple[int, ...] = "none"
    # Loss weight of each exit (same length as every member's exit count); empty = all exits weigh 1.
    exit_weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class BankConfig:
    method: str = "superweights"  # superweights | ssn (NPAS Shapeshifter Networks) | full
    budget: int | float = 0.5  # int: bank parameters; float: fraction of all members' slot weights
    depth_bins: int = 4
    max_templates: int = 4
    share_coefficients: bool = True  # corresponding slots of members share coefficients
    grouping: str = "depth"  # depth (relative-depth bins) | gradient (SuperWeights: split by gradient similarity)
    unshare_epoch: int = 0  # after this epoch (1-based), unshare conflicting coefficients; 0 = never
    unshare_batches: int = 8  # batches of per-member coefficient gradients to compare
    unshare_threshold: float = 0.9  # corresponding slots with cosine below this get their own coefficients
    upsample: str = "repeat"  # ssn: repeat | mask | inter (layers larger than their group's vector)
    ssn_groups: str = "depth"  # ssn: one | depth (bank.depth_bins bins, kinds mixed) | learned (k-means)
    groups: int = 4  # ssn learned: k-means clusters
    pretrain_steps: int = 100  # ssn learned: pre-training steps before k-means


@dataclass(frozen=True)
class GroupingConfig:
    """Gradient-based grouping (bank.grouping = "gradient")."""

    warmup_epochs: int = 2  # training epochs on depth-bin groups before measuring gradients
    batches: int = 8  # training batches over which slot weight gradients are accumulated
    threshold: float = 0.05  # slots whose gradient cosine exceeds this keep sharing (transitively); slot
    # gradients are nearly orthogonal (median cosine ~0.005 on digits), so 0.05 splits 8 depth groups into ~23
    threshold_step: float = 0.1  # lowered by this when a grouping cannot fit the budget ...
    tries: int = 10  # ... at most this many times, then a clear error


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4  # never applied to coefficients
    seed: int = 0
    eval_batch_size: int = 512
    # GPU readiness (ensemble.training.Accelerator). bf16 = torch.autocast around the members' forward;
    # weight generation (bank, coefficients) stays fp32, evaluation too. CPU autocast works as well (slower
    # unless the CPU has bf16 units) and is what the tests exercise.
    precision: str = "fp32"  # fp32 | bf16
    # conv members (inputs, conv weights) in channels_last (NHWC) memory; None (the default, not writable in
    # TOML) = on CUDA only, where cuDNN's NHWC kernels are faster; true/false force it on every device.
    channels_last: bool | None = None
    compile: bool = False  # torch.compile the members' forward in training steps; one warning line if it cannot

    PRECISIONS = ("fp32", "bf16")  # not a field (no annotation)

    def __post_init__(self):
        if self.precision not in self.PRECISIONS:
            raise SuperweightsError(f"train.precision must be fp32 or bf16, got {self.precision!r}")
        if not (self.channels_last is None or isinstance(self.channels_last, bool)):
            raise SuperweightsError(f"train.channels_last must be true or false, got {self.channels_last!r}")


@dataclass(frozen=True)
class AnytimeConfig:
    schedule: str = "greedy"  # greedy (val accuracy gain per FLOP) | member (member-major) | explicit
    order: tuple[int, ...] = ()  # explicit: member index per step, e.g. [0, 1, 0, 1]
    exit_score: str = "max_prob"  # early-exit confidence: max_prob (largest probability) | entropy (exp(-H))


SCHEDULES = ("greedy", "member", "explicit")
EXIT_SCORES = ("max_prob", "entropy")  # anytime/early_exit.py computes them; listed here so configs are checked


@dataclass(frozen=True)
class RayConfig:
    """Ray Train (`superweights train`, `python -m ray_jobs.train`); command-line flags override these."""

    workers: int = -1  # -1 = min(2, CPUs); 0 = run the loop in-process
    member_groups: int = 0  # workers = member_groups x data_replicas; 0 = derive
    data_replicas: int = 0  # 0 = derive
    use_gpu: bool = False
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always checkpointed)
    max_failures: int = 1  # worker failures to recover from (-1 = unlimited)
    cpus_per_worker: int = 0  # CPUs (= torch threads) per worker; 0 = the cluster's free CPUs shared evenly
    address: str = ""  # "" = $RAY_ADDRESS, else a new local Ray
    storage_path: str = "runs/ray"  # Ray Train checkpoints: <storage_path>/<run name>


@dataclass(frozen=True)
class ServeConfig:
    """`superweights serve` (uvicorn or Ray Serve); command-line flags override these. Not part of a run's
    identity: a checkpoint's saved [serve] section is never compared on resume."""

    host: str = "127.0.0.1"  # interface to listen on
    port: int = 8000  # 0 = any free port (uvicorn only)
    device: str = "cpu"  # cpu, cuda or cuda:N
    threads: int = 1  # torch intra-op threads
    access_log: bool = True  # uvicorn: log every request
    max_body_mb: float = 8.0  # larger request bodies are refused with 413
    max_images: int = 256  # images per request
    max_batch_images: int = 64  # images per micro-batch (a larger single request runs alone)
    batch_window_ms: float = 2.0  # FLOPs/no-budget requests wait at most this long for company
    max_pending: int = 1024  # queued requests beyond this get 503
    deadline_margin_ms: float = 1.0  # kept free at the end of a deadline for the response
    deadline_safety: float = 1.25  # measured step times are multiplied by this before a step may start
    input_range: tuple[float, ...] = (0.0, 1.0)  # [low, high] accepted input values; [] = any finite value
    replicas: int = 1  # Ray Serve (--ray): replicas
    max_ongoing_requests: int = 16  # Ray Serve: requests a replica holds at once
    replica_cpus: float = 1.0  # Ray Serve: CPUs reserved per replica
    address: str = ""  # Ray Serve: cluster address; "" = $RAY_ADDRESS, else the running local cluster, else a new one

    def check(self) -> ServeConfig:
        """One-line errors for out-of-range values (the same checks as the flags get)."""
        checks = [("serve.port", self.port, (0, 65535, False, False)), ("serve.threads", self.threads, AT_LEAST_1),
                  ("serve.max_body_mb", self.max_body_mb, ABOVE_0), ("serve.max_images", self.max_images, AT_LEAST_1),
                  ("serve.max_batch_images", self.max_batch_images, AT_LEAST_1),
                  ("serve.batch_window_ms", self.batch_window_ms, AT_LEAST_0),
                  ("serve.max_pending", self.max_pending, AT_LEAST_1),
                  ("serve.deadline_margin_ms", self.deadline_margin_ms, AT_LEAST_0),
                  ("serve.deadline_safety", self.deadline_safety, AT_LEAST_1),
                  ("serve.replicas", self.replicas, AT_LEAST_1),
                  ("serve.max_ongoing_requests", self.max_ongoing_requests, AT_LEAST_1),
                  ("serve.replica_cpus", self.replica_cpus, ABOVE_0)]
        for key, value, (low, high, low_open, high_open) in checks:
            _check_range(key, value, low, high, low_open, high_open)
        r = self.input_range
        if r and not (len(r) == 2 and all(math.isfinite(v) for v in r) and r[0] < r[1]):
            raise SuperweightsError(f"serve.input_range must be [low, high] with low < high (or [] for any value), "
                                    f"got {list(r)}")
        return self


# Sections that say where and how a run executes or is served, not what it trains: a resume may change them,
# and a checkpoint's config.json written before they existed still loads (missing sections take defaults).
RUNTIME_SECTIONS = ("ray", "serve", "debug")


@dataclass(frozen=True)
class DebugConfig:
    crash_at_epoch: int = 0  # tests: one worker raises at this epoch on the first attempt (0 = never)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    anytime: AnytimeConfig = field(default_factory=AnytimeConfig)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, s.name)).items()} for s in dataclasses.fields(self)}

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for tracking systems."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def validate(self) -> Config:
        if self.bank.method not in METHODS:
            raise SuperweightsError(f"bank.method must be one of {', '.join(METHODS)}, got {self.bank.method!r}")
        if self.bank.method == "ssn":
            if self.bank.upsample not in UPSAMPLERS:
                raise SuperweightsError(f"bank.upsample must be one of {', '.join(UPSAMPLERS)}, got {self.bank.upsample!r}")
            if self.bank.ssn_groups not in GROUP_MODES:
                raise SuperweightsError(f"bank.ssn_groups must be one of {', '.join(GROUP_MODES)}, got {self.bank.ssn_groups!r}")
            if self.bank.groups < 1:
                raise SuperweightsError(f"bank.groups must be >= 1, got {self.bank.groups}")
        if self.bank.grouping not in ("depth", "gradient"):
            raise SuperweightsError(f"bank.grouping must be depth or gradient, got {self.bank.grouping!r}")
        # Keys of the SuperWeight method's learning steps: honoured by the training loop, or refused here.
        if self.bank.method != "superweights":
            for key, value, default in (("bank.grouping", self.bank.grouping, "depth"),
                                        ("bank.unshare_epoch", self.bank.unshare_epoch, 0)):
                if value != default:
                    raise SuperweightsError(f"{key}={value!r} is a SuperWeights step: it needs bank.method = "
                                            f"\"superweights\", not {self.bank.method!r}")
        if self.bank.unshare_epoch < 0 or self.bank.unshare_epoch > self.train.epochs:
            raise SuperweightsError(f"bank.unshare_epoch must be between 0 (never) and train.epochs "
                                    f"({self.train.epochs}), got {self.bank.unshare_epoch}")
        if self.bank.unshare_epoch and not self.bank.share_coefficients:
            raise SuperweightsError("bank.unshare_epoch needs bank.share_coefficients = true: with unshared "
                                    "coefficients there is nothing to unshare")
        self._check_ranges()
        if not self.ensemble.members:
            raise SuperweightsError("ensemble.members is empty: name at least one member")
        exits = self.ensemble.exits
        if isinstance(exits, str) and exits not in ("all", "none"):
            raise SuperweightsError(f'ensemble.exits must be "all", "none" or a list of stage indices, got {exits!r}')
        if not isinstance(exits, str) and any(i < 0 for i in exits):
            raise SuperweightsError(f"ensemble.exits: stage indices must be >= 0, got {list(exits)}")
        weights = self.ensemble.exit_weights
        if any(not (math.isfinite(w) and w >= 0) for w in weights):
            raise SuperweightsError(f"ensemble.exit_weights must be >= 0, got {list(weights)}")
        if weights and not any(weights):  # a zero loss trains nothing
            raise SuperweightsError(f"ensemble.exit_weights must not all be 0, got {list(weights)}")
        if self.anytime.schedule not in SCHEDULES:
            raise SuperweightsError(f"anytime.schedule must be one of {', '.join(SCHEDULES)}, got {self.anytime.schedule!r}")
        if self.anytime.exit_score not in EXIT_SCORES:
            raise SuperweightsError(f"anytime.exit_score must be one of {', '.join(EXIT_SCORES)}, "
                                    f"got {self.anytime.exit_score!r}")
        if self.anytime.schedule == "explicit" and not self.anytime.order:
            raise SuperweightsError("anytime.schedule = \"explicit\" needs anytime.order (a member index per step)")
        n = len(self.ensemble.members)
        bad = [m for m in self.anytime.order if not 0 <= m < n]
        if bad:
            raise SuperweightsError(f"anytime.order: member index {bad[0]} does not exist (members 0..{n - 1})")
        return self

    def _check_ranges(self) -> None:
        """Every numeric key against its valid range: a one-line error here, before any data, plan or worker.
        ray.* keys are checked by ray_jobs.options.RayOptions.validate (they may come from flags too), serve.*
        keys by ServeConfig.check (from the loader)."""
        d, b, g, t = self.data, self.bank, self.grouping, self.train
        checks: list[tuple[str, int | float, tuple]] = [
            # both fractions split a pool stratified; 0 would leave an empty split that training cannot
            # evaluate on, 1 an empty pool (the loaders' own checks stay as a second line of defence)
            ("data.val_fraction", d.val_fraction, OPEN_UNIT),
            ("data.test_fraction", d.test_fraction, OPEN_UNIT),  # digits only, checked for every dataset
            ("data.train_per_class", d.train_per_class, AT_LEAST_0),  # 0 = all images
            ("data.image_size", d.image_size, AT_LEAST_0),  # resize side in pixels, 0 = native
            ("bank.depth_bins", b.depth_bins, AT_LEAST_1),
            # SuperWeights: every slot mixes >= 2 templates (no hard ties, DESIGN step 4); SSN wavg may use 1
            ("bank.max_templates", b.max_templates, AT_LEAST_2 if b.method == "superweights" else AT_LEAST_1),
            ("bank.unshare_batches", b.unshare_batches, AT_LEAST_1),
            # a cosine threshold: <= -1 never unshares; above 1 every pair conflicts (tests use 1.01 for that)
            ("bank.unshare_threshold", b.unshare_threshold, (-1.0, 1.01, False, False)),
            ("bank.groups", b.groups, AT_LEAST_1),  # ssn learned: k-means clusters
            ("bank.pretrain_steps", b.pretrain_steps, AT_LEAST_1),
            ("grouping.warmup_epochs", g.warmup_epochs, AT_LEAST_1),
            ("grouping.batches", g.batches, AT_LEAST_1),
            ("grouping.threshold", g.threshold, (-1.0, 1.0, False, False)),  # a cosine similarity
            ("grouping.threshold_step", g.threshold_step, ABOVE_0),  # lowered by a positive step, else no progress
            ("grouping.tries", g.tries, AT_LEAST_1),
            ("train.epochs", t.epochs, AT_LEAST_1),
            ("train.batch_size", t.batch_size, AT_LEAST_1),
            ("train.lr", t.lr, ABOVE_0),  # no upper bound: a diverging lr is caught at its first non-finite step
            ("train.momentum", t.momentum, (0.0, 1.0, False, True)),  # SGD; 1 never forgets a gradient
            ("train.weight_decay", t.weight_decay, AT_LEAST_0),
            ("train.seed", t.seed, (0, 2**63 - 1, False, False)),  # torch generators take 64-bit seeds
            ("train.eval_batch_size", t.eval_batch_size, AT_LEAST_1),
            ("debug.crash_at_epoch", self.debug.crash_at_epoch, AT_LEAST_0),  # 0 = never
        ]
        # bank.budget: an int counts parameters (>= 1), a float is a fraction of the slot weights (> 0); the
        # plan names the true minimum, the memory check (ensemble.planning.check_memory) the maximum
        checks.append(("bank.budget", b.budget, AT_LEAST_1 if isinstance(b.budget, int) else ABOVE_0))
        for key, value, (low, high, low_open, high_open) in checks:
            _check_range(key, value, low, high, low_open, high_open)
        for i, m in enumerate(self.anytime.order):
            if m < 0:
                raise SuperweightsError(f"anytime.order entries are member indices >= 0, got {m} at position {i}")


METHODS = ("superweights", "ssn", "full")

# (low, high, low excluded, high excluded); None = unbounded on that side
AT_LEAST_0 = (0, None, False, False)
AT_LEAST_1 = (1, None, False, False)
AT_LEAST_2 = (2, None, False, False)
ABOVE_0 = (0, None, True, False)
OPEN_UNIT = (0, 1, True, True)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _check_range(key: str, value: int | float, low, high, low_open: bool, high_open: bool) -> None:
    """One-line error naming key, value and range unless the value is inside it (NaN and infinities never are)."""
    finite = isinstance(value, int) or math.isfinite(value)
    ok = finite and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise SuperweightsError(f"{key} must be {_range_text(low, high, low_open, high_open)}, got {value}")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def valid_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, t in _SECTION_TYPES.items() for f in dataclasses.fields(t)]


_SECTION_TYPES = {"data": DataConfig, "ensemble": EnsembleConfig, "bank": BankConfig, "train": TrainConfig,
                  "anytime": AnytimeConfig, "grouping": GroupingConfig,
                  "ray": RayConfig, "serve": ServeConfig, "debug": DebugConfig}

_NUMBER_LISTS = {"ensemble.exit_weights": (int, float), "anytime.order": (int,), "serve.input_range": (int, float)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a TOML value against the field's default type; ints are accepted where floats are expected."""
    if key == "ensemble.exits":
        if isinstance(value, str):
            return value
        if not isinstance(value, list | tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise SuperweightsError(f'{key} must be "all", "none" or a list of stage indices, got {value!r}')
        return tuple(value)
    if key in _NUMBER_LISTS:
        types = _NUMBER_LISTS[key]
        if not isinstance(value, list | tuple) or not all(isinstance(v, types) and not isinstance(v, bool) for v in value):
            raise SuperweightsError(f"{key} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value) if float in types else tuple(value)
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise SuperweightsError(f"{key} must be a list of strings, got {value!r}")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SuperweightsError(f"{key} must be true or false, got {value!r}")
        return value
    if key == "bank.budget":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SuperweightsError(f"{key} must be an integer (parameters) or a float (fraction), got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SuperweightsError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SuperweightsError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise SuperweightsError(f"{key} must be a string, got {value!r}")
    return value


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    base = base or Config()
    sections = {}
    for name, section_type in _SECTION_TYPES.items():
        current = getattr(base, name)
        given = data.get(name, {})
        if not isinstance(given, dict):
            raise SuperweightsError(f"[{name}] must be a table; valid keys: {', '.join(valid_keys())}")
        fields = {f.name for f in dataclasses.fields(section_type)}
        unknown = sorted(set(given) - fields)
        if unknown:
            raise SuperweightsError(f"unknown config key {name}.{unknown[0]}; valid keys: {', '.join(valid_keys())}")
        values = {k: _coerce(f"{name}.{k}", v, getattr(current, k)) for k, v in given.items()}
        sections[name] = dataclasses.replace(current, **values)
    unknown = sorted(set(data) - set(_SECTION_TYPES))
    if unknown:
        raise SuperweightsError(f"unknown config section [{unknown[0]}]; valid keys: {', '.join(valid_keys())}")
    sections["serve"].check()
    return Config(**sections).validate()


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` with a TOML value; a bare word is taken as a string (`data.name=digits`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or len(parts) != 2 or not all(parts) or not raw.strip():
        raise SuperweightsError(f"malformed --set {text!r}: expected section.key=value, e.g. bank.budget=0.25")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        if not raw.strip().replace("-", "").replace("_", "").replace(".", "").replace("/", "").isalnum():
            raise SuperweightsError(f"malformed --set {text!r}: {raw.strip()!r} is not a TOML value") from None
        value = raw.strip()
    return parts[0], parts[1], value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SuperweightsError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SuperweightsError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise SuperweightsError(f"unknown config key {section}.{key}; valid keys: {', '.join(valid_keys())}")
        data[section][key] = value
    return from_dict(data)


def config_from_json(text: str) -> Config:
    return from_dict(json.loads(text))
