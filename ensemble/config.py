"""One frozen config, sections as dataclasses, loaded from TOML with `--set section.key=value` overrides.

Every field has a default, so `Config()` is a valid (digits) run; unknown keys are rejected with the
list of valid ones. Later issues add sections (exits, grouping, ray, ...) to `ensemble.config_sections`
and to `Config` here, never elsewhere; `Config.validate` is `ensemble.config_checks.ConfigChecks`.

Import every config name from here: the sections and the accepted values are re-exported (`__all__`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import SuperweightsError

from .config_checks import EXIT_SCORES, METHODS, SCHEDULES, ConfigChecks
from .config_sections import (
    RUNTIME_SECTIONS,
    AnytimeConfig,
    BankConfig,
    DataConfig,
    DebugConfig,
    EnsembleConfig,
    GroupingConfig,
    RayConfig,
    ServeConfig,
    TrainConfig,
)

__all__ = [
    "EXIT_SCORES", "METHODS", "RUNTIME_SECTIONS", "SCHEDULES",
    "AnytimeConfig", "BankConfig", "Config", "DataConfig", "DebugConfig", "EnsembleConfig", "GroupingConfig",
    "RayConfig", "ServeConfig", "TrainConfig",
    "config_from_json", "from_dict", "load_config", "parse_override", "valid_keys",
]


@dataclass(frozen=True)
class Config(ConfigChecks):
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
