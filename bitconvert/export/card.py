"""The model card (README.md) written into every export folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bitconvert.utils.io import atomic_write_text

# How each weight variant is named and described on the card.
VARIANT_TEXT = {
    "b1.58": ("BitNet b1.58 (ternary)", "weights in {-1, 0, +1} with absmean scales"),
    "bitnet1": ("BitNet 1-bit (binary)", "weights in {-1, +1} (signs around the mean) with absmean scales"),
    "onebit": ("OneBit (1-bit)", "a sign matrix in {-1, +1} between two full-precision scale vectors"),
}
EVAL_START = "<!-- bitconvert:eval:start -->"
EVAL_END = "<!-- bitconvert:eval:end -->"


def render_card(manifest: dict[str, Any], recipe_yaml: str | None = None, train_summary: dict | None = None) -> str:
    spec = manifest["spec"]
    prov = manifest.get("provenance", {})
    loads = ("`AutoModelForCausalLM.from_pretrained(folder)` in plain transformers (its bitnet integration), "
             "or `bitconvert.load_model(folder)` for bitconvert's packed kernels"
             if manifest.get("transformers_compatible") else
             "`import bitconvert` first (it registers the `bitconvert` quantization method with transformers), "
             "then `AutoModelForCausalLM.from_pretrained(folder)`, or `bitconvert.load_model(folder)`")
    title, weights = VARIANT_TEXT.get(spec["variant"], VARIANT_TEXT["b1.58"])
    if spec.get("ternary_fit", "absmean") == "twn":
        weights = "weights in {-1, 0, +1} with TWN scales (0 below 0.7 of the mean magnitude)"
    elif spec.get("ternary_fit") == "learned":
        weights = "weights in {-1, 0, +1} with scales trained alongside the weights (started at TWN's)"
    bits = 2 if spec["variant"] == "b1.58" else 1
    lines = [
        "---", "library_name: transformers", "tags: [bitnet, ternary, quantized, bitconvert]", "---", "",
        f"# {prov.get('source', 'model')} — {title} conversion", "",
        f"Converted by bitconvert from **{prov.get('source', '?')}**. Every linear layer inside the decoder "
        f"blocks is a BitLinear: {weights}, activations quantized to int8 "
        "per token (absmax). Embeddings and the output head stay in "
        f"{manifest.get('export_dtype', 'bfloat16')}.", "",
        "| | |", "| --- | --- |",
        f"| variant | {spec['variant']} |",
        f"| weight scales | {spec['weight_scale']}{' (group ' + str(spec['group_size']) + ')' if spec['weight_scale'] == 'group' else ''} |",
        f"| extra normalisation (SubLN) | {spec['subln']} |",
        f"| quantized layers | {len(manifest['modules'])} ({manifest.get('quantized_parameters', 0):,} weights, {bits} bit{'s' if bits > 1 else ''} each) |",
    ]
    routing = manifest.get("mixture_of_depths")
    if routing:
        lines += [f"| Mixture-of-Depths | every {routing['every']} blocks, training capacity {routing['capacity']:g}, "
                  f"causal decision by {routing['decision']} (docs/variants.md) |"]
    if train_summary:
        lines += [f"| training | {train_summary.get('mode')}: {train_summary.get('steps')} steps, "
                  f"{train_summary.get('tokens'):,} tokens, {train_summary.get('seconds', 0):.0f} s |"]
    lines += ["", "## Loading", "", f"Load with {loads}.", "",
              "```python", "import bitconvert", f"model, tokenizer = bitconvert.load_model('{prov.get('export_dir', '.')}')",
              "```", ""]
    if (train_summary or {}).get("curves"):
        lines += ["## Training curves", "", f"![training curves]({train_summary['curves']})", ""]
    lines += [EVAL_START, "## Evaluation", "", "Not evaluated yet: run `bitconvert eval <folder> --baseline <original>`.",
              EVAL_END, ""]
    if recipe_yaml:
        lines += ["## Recipe", "", "Reproduce with `bitconvert run recipe.yaml`:", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(folder: str | os.PathLike, text: str) -> None:
    atomic_write_text(Path(folder) / "README.md", text)


def update_card_section(folder: str | os.PathLike, body_markdown: str) -> None:
    """Replace the evaluation section of an export's README.md (used by ``bitconvert eval``)."""
    path = Path(folder) / "README.md"
    text = path.read_text() if path.is_file() else f"{EVAL_START}\n{EVAL_END}\n"
    if EVAL_START not in text:
        text += f"\n{EVAL_START}\n{EVAL_END}\n"
    head, rest = text.split(EVAL_START, 1)
    tail = rest.split(EVAL_END, 1)[1] if EVAL_END in rest else ""
    atomic_write_text(path, f"{head}{EVAL_START}\n{body_markdown.rstrip()}\n{EVAL_END}{tail}")
