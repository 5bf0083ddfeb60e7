"""The packed ternary export: a Hugging Face model folder whose quantized weights take 2 bits each.

Layout (see docs/formats.md):
  config.json         the model's config plus ``quantization_config``. When every converted layer
                      fits transformers' own bitnet layout (b1.58, one scale per tensor, plain
                      nn.Linear), it is ``quant_method: bitnet`` and plain transformers loads the
                      folder. Otherwise it is ``quant_method: bitconvert``, which transformers loads
                      once ``import bitconvert`` has registered the quantizer below.
  model.safetensors   ``<layer>.weight``: uint8 (out/4, in), codes+1 packed along the output dim;
                      ``<layer>.weight_scale``: float32 inverse scale, shape (1,), (out,) or
                      (out, in/group); other tensors in the export dtype. The 1-bit variants
                      (``bitnet1``, ``onebit``) store ``weight`` as uint8 (out, in/8), signs packed
                      8 inputs to a byte; ``onebit`` stores ``input_scale`` (in,) and
                      ``output_scale`` (out,) in float32 instead of ``weight_scale``.
                      A model with Mixture-of-Depths routing (bitconvert.mod) also holds
                      ``<block>.mod_router.*`` in float32, and its ``quantization_config`` (always
                      ``bitconvert`` then) records ``mixture_of_depths`` so the loader rebuilds the
                      routed blocks before reading weights.
  bitconvert.json     format description, converted modules, provenance, sha256 of every file.
                      Written last: a folder without it (or with a checksum that fails) is not a
                      finished export.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from bitconvert.kernels import triton_available
from bitconvert.layers import BitExperts, BitLinear, PackedBitLinear, PackedExperts
from bitconvert.quant import QuantSpec, pack_ternary, pack_weight
from bitconvert.utils.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

FORMAT_NAME = "bitconvert-ternary"
FORMAT_VERSION = 1
MANIFEST = "bitconvert.json"
WEIGHTS = "model.safetensors"
UNTRACKED = ("training/", "eval/", ".")


class ExportError(ValueError):
    """An export folder is missing, unfinished or corrupt."""


# --------------------------------------------------------------------------- transformers integration

def _register_with_transformers() -> None:
    """Teach ``AutoModelForCausalLM.from_pretrained`` to load ``quant_method: bitconvert`` folders."""
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if "bitconvert" in AUTO_QUANTIZER_MAPPING:
        return

    @register_quantization_config("bitconvert")
    class BitconvertQuantConfig(QuantizationConfigMixin):
        def __init__(self, spec: dict | None = None, modules: dict | None = None,
                     mixture_of_depths: dict | None = None, **kwargs):
            self.quant_method = "bitconvert"
            self.spec = spec or {}
            self.modules = modules or {}
            self.mixture_of_depths = mixture_of_depths

    @register_quantizer("bitconvert")
    class BitconvertHfQuantizer(HfQuantizer):
        requires_calibration = True

        def _process_model_before_weight_loading(self, model, **kwargs):
            cfg = self.quantization_config
            install_packed_modules(model, QuantSpec(**cfg.spec), cfg.modules)
            if getattr(cfg, "mixture_of_depths", None):
                from bitconvert.mod import install_mixture_of_depths

                install_mixture_of_depths(model, cfg.mixture_of_depths)

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

        def param_needs_quantization(self, *args, **kwargs):
            return False


def install_packed_modules(model: nn.Module, spec: QuantSpec, modules: dict[str, dict[str, Any]]) -> None:
    """Replace the listed modules of a freshly built model (often on the meta device) by packed ones."""
    for name, info in modules.items():
        current = model.get_submodule(name)
        device = next(iter(current.parameters()), torch.empty(0)).device
        if info["kind"] == "experts":
            new = PackedExperts(info["num_experts"], info["hidden"], info["intermediate"], current.act_fn,
                                spec=spec, device=device)
        else:
            new = PackedBitLinear(info["in_features"], info["out_features"], info["bias"], spec=spec,
                                  use_rms_norm=info.get("rms_norm", False), device=device)
        model.set_submodule(name, new)


def _swap_transformers_bitlinear(model: nn.Module, spec: QuantSpec) -> None:
    """transformers' own BitLinear unpacks every call; use bitconvert's kernels on the same buffers."""
    from transformers.integrations.bitnet import BitLinear as HfBitLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, HfBitLinear):
            packed = PackedBitLinear(module.in_features, module.out_features, module.bias is not None, spec=spec,
                                     use_rms_norm=module.rms_norm is not None, device="meta")
            packed.weight, packed.weight_scale, packed.bias = module.weight, module.weight_scale.float(), module.bias
            packed.rms_norm = module.rms_norm
            model.set_submodule(name, packed)


# --------------------------------------------------------------------------- export

def _module_entry(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, BitExperts):
        experts, two_inter, hidden = module.gate_up_proj.shape
        return {"kind": "experts", "num_experts": experts, "hidden": hidden, "intermediate": two_inter // 2}
    return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None, "rms_norm": module.rms_norm is not None}


def _unconverted_linears(model: nn.Module, converted: set[str]) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in converted)


def transformers_compatible(model: nn.Module, spec: QuantSpec, modules: dict[str, nn.Module]) -> bool:
    """Can transformers' own bitnet quantizer (``linear_class: bitlinear``) represent this model?"""
    from bitconvert.mod import routed_blocks

    return (spec.variant == "b1.58" and spec.weight_scale == "tensor" and spec.subln in ("none", "all")
            and not routed_blocks(model)
            and all(isinstance(m, BitLinear) and not m.transposed_source
                    for m in modules.values()))


def packed_state_dict(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Tensors to save, and the description of every quantized module."""
    from bitconvert.convert import quantized_modules

    modules = quantized_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        if isinstance(module, BitExperts):
            for proj, (codes, inv) in module.ternary().items():
                tensors[f"{name}.{proj}"] = pack_ternary(codes).cpu()
                tensors[f"{name}.{proj}_scale"] = inv.cpu()
        else:
            codes, scales = module.quantized_codes()
            tensors[f"{name}.weight"] = pack_weight(codes, module.spec.variant).cpu()
            tensors.update({f"{name}.{key}": value.cpu() for key, value in scales.items()})
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().to(dtype).cpu()
            if module.rms_norm is not None:
                tensors[f"{name}.rms_norm.weight"] = module.rms_norm.weight.detach().to(dtype).cpu()
    owned = tuple(f"{name}." for name in modules)
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        # A tied output head shares the embedding's storage; safetensors keeps it once and
        # transformers re-ties it on load.
        if key.startswith(owned) or value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        # Mixture-of-Depths routers stay float32: rounding them would move tokens across the threshold.
        keep = value.is_floating_point() and ".mod_router." not in key
        tensors[key] = value.detach().to(dtype).cpu() if keep else value.detach().cpu()
    return {k: v.contiguous() for k, v in tensors.items()}, {n: _module_entry(m) for n, m in modules.items()}


def export_ternary(model: nn.Module, tokenizer, out_dir: str | os.PathLike, spec: QuantSpec, *,
                   dtype: torch.dtype = torch.bfloat16, provenance: dict[str, Any] | None = None) -> Path:
    """Write a converted (BitLinear) model as a packed folder. Returns the folder.

    The name is historical: every variant goes through here (``spec.variant`` decides the packing:
    2-bit ternary for b1.58, 1-bit signs for bitnet1 and onebit), and so do Mixture-of-Depths routers.
    """
    from bitconvert.convert import quantized_modules
    from bitconvert.mod import mod_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is unfinished until the manifest is back
    modules = quantized_modules(model)
    tensors, entries = packed_state_dict(model, dtype)

    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    compatible = transformers_compatible(model, spec, modules)
    routing = mod_config(model)
    if compatible:
        config["quantization_config"] = {
            "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
            "modules_to_not_convert": _unconverted_linears(model, set(modules)),
            "use_rms_norm": spec.subln == "all", "rms_norm_eps": spec.rms_norm_eps}
    else:
        config["quantization_config"] = {"quant_method": "bitconvert", "spec": spec.model_dump(), "modules": entries}
        if routing is not None:
            config["quantization_config"]["mixture_of_depths"] = routing.model_dump()

    weights_tmp = out / f".{WEIGHTS}.tmp"
    try:
        save_file(tensors, str(weights_tmp), metadata={"format": "pt", "bitconvert_format": FORMAT_NAME})
        os.replace(weights_tmp, out / WEIGHTS)
    finally:
        weights_tmp.unlink(missing_ok=True)
    atomic_write_json(out / "config.json", config)
    if getattr(model, "generation_config", None) is not None:
        atomic_write_json(out / "generation_config.json", model.generation_config.to_dict())
    if tokenizer is not None:
        tokenizer.save_pretrained(out)

    quantized = sum(v.numel() * 8 // spec.bits_per_weight for k, v in tensors.items()
                    if k.endswith(("weight", "proj")) and v.dtype == torch.uint8)
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "transformers_compatible": compatible, "spec": spec.model_dump(), "modules": entries,
        "export_dtype": config["dtype"], "quantized_parameters": quantized,
        "mixture_of_depths": routing.model_dump() if routing is not None else None,
        "provenance": provenance or {}, "files": {}}
    write_manifest(out, manifest)
    log.info("exported %s (%s)", out, "loads in plain transformers" if compatible else "loads after `import bitconvert`")
    return out


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Record the sha256 of every file that defines the model and write the manifest last.

    The model card, training state and evaluation results may change later and are not listed.
    """
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if (path.is_file() and rel not in (MANIFEST, "README.md", "recipe.yaml") and not rel.startswith(UNTRACKED)
                and "/." not in rel):
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest["files"] = files
    atomic_write_json(out / MANIFEST, manifest)


def read_manifest(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Read ``bitconvert.json`` and check that every file it lists is whole."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{path} is not a finished bitconvert export (no {MANIFEST}); re-run the export")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{manifest_path} is corrupt: {err}") from err
    if manifest.get("format") != FORMAT_NAME:
        raise ExportError(f"{manifest_path} describes format {manifest.get('format')!r}, not {FORMAT_NAME!r}")
    for rel, info in manifest.get("files", {}).items():
        file = path / rel
        if not file.is_file():
            raise ExportError(f"{file} is missing from the export")
        if file.stat().st_size != info["bytes"] or (verify and sha256_file(file) != info["sha256"]):
            raise ExportError(f"{file} is corrupt or half-written (size or sha256 differs from {MANIFEST})")
    return manifest


def load_ternary(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 verify: bool = True):
    """Load an export (any variant, with or without Mixture-of-Depths) as ``(model, tokenizer)`` with
    packed layers (fast kernels where available). On CUDA an sdpa model's decode steps attend with
    bitconvert's decode attention (:mod:`bitconvert.layers.attention`; ``BITCONVERT_DECODE_ATTENTION=0``
    keeps transformers' sdpa), and on GPUs where bitconvert's kernels launch with PDL, torch.compile is
    set to launch its kernels that way too (``triton_ternary.compile_with_pdl``; ``BITCONVERT_INDUCTOR_PDL=0``
    leaves torch's setting alone)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest(path, verify=verify)
    spec = QuantSpec(**manifest["spec"])
    _register_with_transformers()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    _swap_transformers_bitlinear(model, spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()
    if model.device.type == "cuda":
        from bitconvert.layers.attention import use_decode_attention

        use_decode_attention(model)
        if triton_available():
            from bitconvert.kernels.triton_ternary import compile_with_pdl

            compile_with_pdl(model.device)
    return model, tokenizer
