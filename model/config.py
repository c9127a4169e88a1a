"""One typed configuration object with named presets.

`Config.from_name("tiny")` gives a preset; `Config.load(preset, yaml_path, overrides)`
layers a YAML file and `section.field=value` overrides on top of it, the way the
CLI and the pipeline components build theirs. Every section is a frozen
dataclass validated in `__post_init__`, so a bad value fails when the config is
made, with the field's name, not deep inside a step.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says which."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """The data: how the synthetic set is drawn, ingest canonicalises, validation accepts."""

    image_size: int = 64
    # Synthetic set. `heldout_fraction` of the images show a (colour, shape) pair
    # that never appears in train/validation: the compositional-generalisation split.
    num_images: int = 6000
    seed: int = 0
    heldout_fraction: float = 0.1
    validation_fraction: float = 0.05
    # Ingest. Rows without a split get one from their content hash, so re-ingesting
    # the same files gives the same split.
    shard_size: int = 1000
    caption_column: str | None = None  # None: "text", else "caption"
    max_image_pixels: int = 50_000_000  # larger declared sizes are decompression bombs
    # Validation (Great Expectations). Each row-level expectation allows at most
    # `max_quarantine_fraction` failures; past that the run stops.
    min_image_side: int = 16
    max_image_side: int = 8192
    max_aspect_ratio: float = 4.0
    max_caption_chars: int = 1000
    max_caption_words: int = 200
    max_quarantine_fraction: float = 0.05
    min_split_fraction: float = 0.01  # each split present must hold at least this share
    max_split_fraction: float = 0.95

    def __post_init__(self) -> None:
        _check(8 <= self.image_size <= 1024, f"data.image_size={self.image_size}: use 8..1024")
        _check(self.num_images >= 10, f"data.num_images={self.num_images}: use at least 10")
        _check(0 < self.heldout_fraction < 0.5, "data.heldout_fraction must be in (0, 0.5)")
        _check(0 < self.validation_fraction < 0.5, "data.validation_fraction must be in (0, 0.5)")
        _check(self.shard_size >= 1, "data.shard_size must be >= 1")
        _check(self.max_image_pixels > 0, "data.max_image_pixels must be > 0")
        _check(
            1 <= self.min_image_side <= self.max_image_side,
            "data.min_image_side must be in 1..data.max_image_side",
        )
        _check(self.max_aspect_ratio >= 1, "data.max_aspect_ratio must be >= 1")
        _check(self.max_caption_chars >= 1, "data.max_caption_chars must be >= 1")
        _check(self.max_caption_words >= 1, "data.max_caption_words must be >= 1")
        _check(
            0 <= self.max_quarantine_fraction <= 1, "data.max_quarantine_fraction must be in [0, 1]"
        )
        _check(
            0 <= self.min_split_fraction <= self.max_split_fraction <= 1,
            "data.min_split_fraction <= data.max_split_fraction, both in [0, 1]",
        )


@dataclass(frozen=True)
class TrackingConfig:
    """Where MLflow runs go. None: a SQLite store and artifact folder under `work_dir`."""

    tracking_uri: str | None = None
    experiment: str = "parti-ops"

    def __post_init__(self) -> None:
        _check(bool(self.experiment.strip()), "tracking.experiment must not be empty")


@dataclass(frozen=True)
class Config:
    """The whole configuration: one frozen section per concern."""

    name: str = "tiny"
    work_dir: str = "outputs"  # run outputs: MLflow store, kfp.local pipeline root
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @classmethod
    def from_name(cls, name: str) -> Config:
        """A named preset; unknown names raise an error listing the presets."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def load(
        cls,
        preset: str = "tiny",
        yaml_path: str | Path | None = None,
        overrides: dict[str, Any] | list[str] | None = None,
    ) -> Config:
        """A preset, then a YAML file, then overrides, each on top of the last.

        Args:
            preset: a name from `PRESETS`; a YAML file's own `preset:` key wins over it.
            yaml_path: a file of nested sections, e.g. `data: {image_size: 32}`.
            overrides: `{"data.image_size": 32}` or `["data.image_size=32"]`.
        """
        tree: dict[str, Any] = {}
        if yaml_path is not None:
            path = Path(yaml_path)
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ConfigError(f"{path}: cannot read config YAML ({err})") from err
            _check(isinstance(loaded, dict), f"{path}: expected a mapping of sections at the top")
            tree = loaded
            preset = tree.pop("preset", preset)
        config = cls.from_name(preset)
        if tree:
            config = config.merge(tree)
        if overrides:
            config = config.merge(parse_overrides(overrides))
        return config

    def merge(self, tree: dict[str, Any]) -> Config:
        """A new config with nested values from `tree` (dotted keys allowed) replacing ours."""
        return _merge(self, _nest(tree), prefix="")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Inverse of `to_json`: how pipeline components receive the config."""
        return cls().merge(json.loads(text))  # the JSON holds every field, the name too

    def flat(self) -> dict[str, Any]:
        """`{"data.image_size": 64, ...}`: the form logged as MLflow params."""
        out: dict[str, Any] = {}

        def walk(node: dict[str, Any], prefix: str) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    out[f"{prefix}{key}"] = value

        walk(self.to_dict(), "")
        return out

    def mlflow_tracking_uri(self) -> str:
        """The configured URI, else a SQLite file under `work_dir` (absolute, so steps agree)."""
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        return f"sqlite:///{(Path(self.work_dir) / 'mlflow.db').resolve()}"


def parse_overrides(items: dict[str, Any] | list[str]) -> dict[str, Any]:
    """`["data.image_size=32"]` → `{"data.image_size": 32}`; values are read as YAML scalars."""
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        _check(bool(sep) and bool(key.strip()), f"override {item!r}: use section.field=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _nest(tree: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in tree.items():
        node = nested
        *parents, leaf = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), f"config key {key!r} mixes a value and a section")
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return nested


def _merge(obj: Any, tree: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes: dict[str, Any] = {}
    for key, value in tree.items():
        if key not in known:
            raise ConfigError(
                f"unknown config key {prefix + key!r}; known keys here: {', '.join(known)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _check(isinstance(value, dict), f"config key {prefix + key!r} is a section")
            changes[key] = _merge(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, hints[key], prefix + key)
    try:
        return dataclasses.replace(obj, **changes)
    except TypeError as err:
        raise ConfigError(f"config section {prefix or 'top'}: {err}") from err


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a value against a field's annotation, converting int → float where asked."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"config key {key!r}: expected {names}, got {value!r}")


PRESETS: dict[str, Config] = {
    # Runs end to end on two CPU cores in minutes.
    "tiny": Config(name="tiny"),
    # A larger synthetic set and images for a single GPU.
    "small": Config(name="small", data=DataConfig(image_size=128, num_images=50_000)),
}
