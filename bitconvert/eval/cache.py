"""The baseline's scores, cached: the original model does not change between runs, so score it once.

An entry is keyed by everything that can change a score: which model (and its files' identity),
which task or text file (and its data files' content), the limit, batch size, max length, dtype,
device type, and the versions of the harness, transformers, torch and bitconvert. Any change is a
new key, hence a miss; stale entries are never read, only left behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from bitconvert.utils.io import atomic_write_json, cache_dir, sha256_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_UNTRACKED_FILES = {"README.md", "recipe.yaml"}  # written after the model; they don't change its scores


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def software_versions() -> dict[str, str]:
    return {name: _version(name) for name in ("lm_eval", "transformers", "torch", "bitconvert")}


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Content identity of a small file (data, text): its sha256."""
    path = Path(path).resolve()
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _stat(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def model_identity(spec: str | os.PathLike) -> dict[str, Any]:
    """Identity of a model spec without loading it: file sizes and mtimes, or an export's sha256s."""
    from bitconvert.sources import EMBEDDED, resolve

    source = resolve(spec)
    ident: dict[str, Any] = {"kind": source.kind, "spec": str(spec)}
    if source.kind == "embedded":
        ident["package"] = EMBEDDED[source.spec].package
        ident["file"] = _stat(source.path / source.gguf_file)
    elif source.kind == "gguf":
        ident["path"] = str(source.path / source.gguf_file)
        ident["file"] = _stat(source.path / source.gguf_file)
    elif source.kind == "ternary":
        from bitconvert.export.packed import read_manifest

        ident["path"] = str(source.path)
        ident["files"] = {k: v["sha256"] for k, v in read_manifest(source.path, verify=False)["files"].items()}
    elif source.kind == "folder":
        ident["path"] = str(source.path)
        ident["files"] = {p.name: _stat(p) for p in sorted(source.path.iterdir())
                          if p.is_file() and p.name not in _UNTRACKED_FILES and not p.name.startswith(".")}
    else:  # hub: the commit the local hub cache resolves "main" to, when it has one
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / f"models--{source.spec.replace('/', '--')}" / "refs" / "main"
        ident["revision"] = ref.read_text().strip() if ref.is_file() else None
    return ident


def cache_key(**parts: Any) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "software": software_versions(), **parts}


class BaselineCache:
    """JSON files under ``<cache_dir>/eval``, one per (baseline, task or file, settings)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "eval"

    def _path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return self.root / f"{digest[:32]}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        # The file name is a hash of the key; compare the key itself so that a collision or a
        # hand-edited file never passes for a hit.
        if entry.get("key") != json.loads(json.dumps(key, sort_keys=True, default=str)):
            return None
        log.info("baseline scores from cache: %s", path)
        return entry["result"]

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> Path:
        path = self._path(key)
        atomic_write_json(path, json.loads(json.dumps({"key": key, "result": result}, sort_keys=True, default=str)))
        return path
