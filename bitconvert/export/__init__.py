"""Export formats. ``packed`` is always written; the others are registered here by name."""

from bitconvert.export.gguf import EXPORTERS as GGUF_EXPORTERS
from bitconvert.export.packed import export_ternary, load_ternary, read_manifest

# name -> exporter(model, tokenizer, out_dir, spec) -> path of what it wrote
EXPORTERS: dict = {**GGUF_EXPORTERS}

__all__ = ["EXPORTERS", "export_ternary", "load_ternary", "read_manifest"]
