"""One Settings object; the only reader of ``os.environ``.

Every setting has a ``SORTER_`` environment variable; CLI flags override it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from sorter.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///sorter.db"


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

#: The least value of each numeric setting (0 for workers and inference threads: one per core).
_AT_LEAST: dict[str, float] = {
    "concurrency": 1,
    "batch_size": 1,
    "workers": 0,
    "frames": 1,
    "inference_threads": 0,
    "settle": 0.0,
    "sweep_interval": 0.0,
    "sweep_age": 0.0,
    "metrics_port": 0,
}
#: Settings that must be above zero.
_POSITIVE = ("rescan", "visibility_timeout")


def _coerce(kind: Any, text: str) -> Any:
    if kind in (int, "int", "int | None"):
        return int(text)
    if kind in (float, "float", "float | None"):
        return float(text)
    if kind in (bool, "bool"):
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:  # a typo must not read as "off"
            raise ValueError(f"not one of {', '.join(_TRUE + _FALSE)}")
        return word in _TRUE
    if kind in ("Path | None",):
        return Path(text)
    return text


@dataclass(frozen=True)
class Settings:
    """Runtime settings for every ``sorter`` command."""

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str | None = None
    queue: str = "sorter"  # Celery queue the producers fill and ``sorter worker`` consumes
    concurrency: int = 1  # ``sorter worker``: worker processes (one resident model each)
    sweep_interval: float = 300.0  # ``sorter worker``: seconds between sweeps for stuck ``pending``; 0: off
    sweep_age: float = 900.0  # seconds an instance must have been ``pending`` before a sweep re-enqueues it
    visibility_timeout: float = 3600.0  # seconds before Redis redelivers a task whose worker vanished
    model: Path | None = None  # None: the bundled default model
    device: str | None = None  # None: CUDA when available, else CPU
    batch_size: int = 32
    workers: int = 0  # decode processes; 0: one per core
    frames: int = 1  # frames classified per multi-frame instance
    full_decode: bool = False  # JPEG 2000 / JPEG frames in full, not at the resolution the model needs
    inference_threads: int = 0  # CPU threads of the forward pass; 0: the cores the decode processes leave
    runtime: str = "auto"  # forward pass: auto | torch | onnx (sorter.model.runtime)
    cache_dir: Path | None = None  # exported ONNX graphs (sorter.model.graph_cache); None: the user cache
    after: str = "keep"  # ``sorter watch``: keep | delete | move:DIR once a file's instance is terminal
    settle: float = 5.0  # ``sorter watch``: seconds a file's size and mtime must stay unchanged
    rescan: float = 60.0  # ``sorter watch``: seconds between full rescans of the folder
    rules: Path | None = None  # a rules file (sorter.rules) applied after each committed batch; None: none
    metrics_port: int = 0  # ``listen``/``watch``/``worker``: Prometheus /metrics port; 0: no server
    metrics_bind: str = "127.0.0.1"  # address of the metrics server

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``SORTER_*`` variables, then non-None ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            text = env.get(f"SORTER_{item.name.upper()}")
            if text not in (None, ""):
                try:
                    values[item.name] = _coerce(item.type, text)
                except ValueError as exc:
                    raise ConfigError(
                        f"SORTER_{item.name.upper()}={text!r} is not a valid {item.type}"
                        + (f" ({exc})" if item.type in (bool, "bool") else "")
                    ) from exc
        settings = cls(**values)
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})

    def __post_init__(self) -> None:
        """Refuse a value no command could use (``--frames 0`` failed every image as a decode
        error), naming the variable and the option it comes from."""
        for name, least in _AT_LEAST.items():
            if getattr(self, name) < least:
                raise ConfigError(f"{_named(name)} must be at least {least:g}, not {getattr(self, name)}")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_named(name)} must be above 0, not {getattr(self, name)}")
        if self.metrics_port > 65535:
            port = self.metrics_port
            raise ConfigError(f"{_named('metrics_port')} must be a port from 0 to 65535, not {port}")

    @property
    def graph_cache_dir(self) -> Path:
        """Where exported ONNX graphs are kept: ``cache_dir``, else ``$XDG_CACHE_HOME/dicom-sorter/onnx``."""
        if self.cache_dir is not None:
            return self.cache_dir
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "dicom-sorter" / "onnx"

    @property
    def decode_workers(self) -> int:
        """Decode processes to start (``workers`` or the core count)."""
        return self.workers or os.cpu_count() or 1


def _named(field: str) -> str:
    return f"SORTER_{field.upper()} (--{field.replace('_', '-')})"
