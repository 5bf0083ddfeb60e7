"""bitconvert: turn a Hugging Face causal LM into a BitNet b1.58 model.

    import bitconvert
    recipe = bitconvert.Recipe(model="smollm2-135m", output="tern", train={"mode": "distill", "minutes": 5})
    bitconvert.quantize(recipe)
    model, tokenizer = bitconvert.load_model("tern")
"""

from bitconvert.api import QuantizeResult, generate, quantize
from bitconvert.convert import UnsupportedModuleError, convert_to_bitnet
from bitconvert.export.packed import _register_with_transformers
from bitconvert.quant import QuantSpec
from bitconvert.recipes.loading import RecipeError, load_recipe
from bitconvert.recipes.schema import Recipe
from bitconvert.sources import ModelSourceError, load_model

__version__ = "0.1.0"

# `AutoModelForCausalLM.from_pretrained` can load bitconvert exports once this package is imported.
_register_with_transformers()

__all__ = [
    "ModelSourceError",
    "QuantSpec",
    "QuantizeResult",
    "Recipe",
    "RecipeError",
    "UnsupportedModuleError",
    "convert_to_bitnet",
    "generate",
    "load_model",
    "load_recipe",
    "quantize",
]
