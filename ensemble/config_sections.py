"""The config's sections, one frozen dataclass each (`[data]`, `[ensemble]`, `[bank]`, ...): every key, its
default and what it means. `ensemble.config.Config` holds one of each; checks that involve more than one key
are `ensemble.config_checks.ConfigChecks`, except `ServeConfig.check` (serve.* is never part of a run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.errors import SuperweightsError

from .config_checks import ABOVE_0, AT_LEAST_0, AT_LEAST_1, check_range


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
    # images per evaluation batch (validation, test, `evaluate`); 0 (the default) = automatic: 512 on CUDA, on CPU
    # as many as keep a batch's activations near the caches (`ensemble.data.eval_batch_for`)
    eval_batch_size: int = 0
    # GPU readiness (ensemble.training.Accelerator). bf16 = torch.autocast around the members' forward;
    # weight generation (bank, coefficients) stays fp32, evaluation too. CPU autocast works as well (slower
    # unless the CPU has bf16 units) and is what the tests exercise.
    precision: str = "fp32"  # fp32 | bf16
    # conv members (inputs, conv weights) in channels_last (NHWC) memory; None (the default, not writable in
    # TOML) = on, on every device: cuDNN's NHWC kernels are faster, and so are oneDNN's on this CPU (a training
    # step 17-21% faster at 28x28/32x32, 2-4% on digits; BENCHMARKS.md); false = row-major.
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


SERVE_MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


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
    # layout of the conv weights: "auto" measures contiguous and channels_last per batch-size bucket at start-up
    # and runs each bucket in the faster one (holds the conv weights twice); "contiguous" | "channels_last" fix it
    memory_format: str = "auto"
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
            check_range(key, value, low, high, low_open, high_open)
        if self.memory_format not in SERVE_MEMORY_FORMATS:
            raise SuperweightsError(f"serve.memory_format must be one of {', '.join(SERVE_MEMORY_FORMATS)}, "
                                    f"got {self.memory_format!r}")
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
