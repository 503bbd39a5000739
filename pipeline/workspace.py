"""Where every generated file lives: one root, ``$SSNAREC_HOME`` (default ``./workspace``).

Sub-folders: raw/ (source dumps a user drops in), data/ (canonical datasets), store/ (stage-one embeddings),
runs/ (stage-two runs), reports/ (tables and figures), cache/ (downloaded wheels and model folders).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SSNAREC_HOME"
DEFAULT_HOME = "workspace"


def home() -> Path:
    """The workspace root, from $SSNAREC_HOME or ./workspace; created on first use."""
    root = Path(os.environ.get(ENV_VAR) or DEFAULT_HOME).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sub(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def raw_dir() -> Path:
    return _sub("raw")


def data_dir() -> Path:
    return _sub("data")


def store_dir() -> Path:
    return _sub("store")


def runs_dir() -> Path:
    return _sub("runs")


def reports_dir() -> Path:
    return _sub("reports")


def cache_dir() -> Path:
    return _sub("cache")
