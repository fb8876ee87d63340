"""`RayOptions`: the view of a `Config` that the Ray Train driver reads, built in one place (`from_config`).

The values live in the config's `[ray]` section (and `debug.crash_at_epoch`); `superweights train` flags
override them by writing into the config (`with_ray_flags`), so the config saved with a checkpoint and logged
to MLflow is what actually ran. Precedence: flag > `--set ray.key=value` > TOML > default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from core.errors import SuperweightsError
from ensemble.config import Config, RayConfig

_RAY_FIELDS = tuple(f.name for f in dataclasses.fields(RayConfig))


@dataclass(frozen=True)
class RayOptions:
    """`config.ray` + `config.debug.crash_at_epoch`, flat (field meanings: `ensemble.config.RayConfig`)."""

    workers: int = RayConfig.workers
    member_groups: int = RayConfig.member_groups
    data_replicas: int = RayConfig.data_replicas
    use_gpu: bool = RayConfig.use_gpu
    checkpoint_every: int = RayConfig.checkpoint_every
    max_failures: int = RayConfig.max_failures
    cpus_per_worker: int = RayConfig.cpus_per_worker
    address: str = RayConfig.address
    storage_path: str = RayConfig.storage_path
    crash_at_epoch: int = 0  # debug: one worker raises during this epoch, first attempt only (0 = off)

    @classmethod
    def from_config(cls, config: Config) -> RayOptions:
        """The one place a `RayOptions` is built from a config."""
        return cls(**{k: getattr(config.ray, k) for k in _RAY_FIELDS}, crash_at_epoch=config.debug.crash_at_epoch)

    def into(self, config: Config) -> Config:
        """`config` with its `[ray]` / `[debug]` sections set to these options (the inverse of `from_config`)."""
        ray = dataclasses.replace(config.ray, **{k: getattr(self, k) for k in _RAY_FIELDS})
        debug = dataclasses.replace(config.debug, crash_at_epoch=self.crash_at_epoch)
        return dataclasses.replace(config, ray=ray, debug=debug)

    def validate(self) -> RayOptions:
        for key, value, low in (("ray.workers", self.workers, -1), ("ray.checkpoint_every", self.checkpoint_every, 1),
                                ("ray.cpus_per_worker", self.cpus_per_worker, 0),
                                ("ray.max_failures", self.max_failures, -1), ("debug.crash_at_epoch", self.crash_at_epoch, 0)):
            if value < low:
                raise SuperweightsError(f"{key} must be >= {low}, got {value}")
        return self


def with_ray_flags(config: Config, given: dict[str, Any]) -> Config:
    """`config` with the command-line values in `given` (RayOptions field -> value; None = flag not given)."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return config
    return dataclasses.replace(RayOptions.from_config(config), **given).into(config)
