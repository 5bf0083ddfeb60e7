"""Matrix products with packed ternary weights.

``ternary_linear`` is the one entry point: it quantizes activations to int8 per token and
multiplies them with 2-bit packed weights. On CPU it runs the torch reference below.
"""

from bitconvert.kernels.reference import ternary_linear_reference


def ternary_linear(x, packed, inv_scale, bias=None, *, granularity="tensor", group_size=128):
    return ternary_linear_reference(x, packed, inv_scale, bias, granularity=granularity, group_size=group_size)


__all__ = ["ternary_linear", "ternary_linear_reference"]
