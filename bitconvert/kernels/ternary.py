"""``ternary_linear``: one entry point, the fastest correct path for the device.

- CUDA tensors go to the Triton kernels (:mod:`bitconvert.kernels.triton_ternary`), imported on
  first use so that CPU-only installs need no triton. Cases no kernel covers (float64, odd group
  sizes, autograd) take the reference.
- CPU tensors take a torch path that can keep the unpacked weight between calls
  (:class:`TernaryCache`): unpacking costs several passes over the weight on every call, which
  dominates a small batch.

Every path computes what :func:`ternary_linear_reference` computes: int8 activation codes times
ternary codes summed exactly, then divided by both scales once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Literal

import torch

from bitconvert.kernels.reference import quantized_linear_reference, swiglu_reference, ternary_linear_reference
from bitconvert.quant import int8_absmax_quantize, ternary_dequantize, unpack_ternary

log = logging.getLogger(__name__)

CpuCache = Literal["none", "int8", "float"]
CPU_CACHES: tuple[str, ...] = ("none", "int8", "float")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TernaryCache:
    """What :func:`ternary_linear` may keep between calls for one packed weight.

    ``cpu`` chooses the CPU trade-off between memory and speed (bytes per weight; packed is 0.25):
    ``none`` unpacks on every call (nothing kept), ``int8`` keeps the codes (1 byte; integer
    matmul where torch has one on CPU), ``float`` keeps float32 codes (4 bytes). Per-group scales
    keep the dequantized float32 weight under ``int8`` and ``float``. The cache follows the packed
    tensor: a new tensor, a new device or an in-place update (``load_state_dict``) rebuilds it.
    """

    def __init__(self, cpu: CpuCache = "int8"):
        if cpu not in CPU_CACHES:
            raise ValueError(f"unknown CPU cache {cpu!r}; expected one of {CPU_CACHES}")
        self.cpu = cpu
        self._key: tuple | None = None
        self._weight: torch.Tensor | None = None

    def clear(self) -> None:
        self._key, self._weight = None, None

    @property
    def nbytes(self) -> int:
        return 0 if self._weight is None else self._weight.numel() * self._weight.element_size()

    def cpu_weight(self, packed: torch.Tensor, inv_scale: torch.Tensor, granularity: str,
                   group_size: int) -> torch.Tensor:
        key = (packed.data_ptr(), packed._version, packed.device, inv_scale.data_ptr(), inv_scale._version,
               granularity, group_size, self.cpu)
        if key != self._key:
            self._weight = _cpu_weight(packed, inv_scale, granularity, group_size, self.cpu)
            self._key = key
        return self._weight

    def __repr__(self) -> str:
        return f"TernaryCache(cpu={self.cpu!r}, nbytes={self.nbytes})"


def _cpu_weight(packed, inv_scale, granularity, group_size, mode) -> torch.Tensor:
    if granularity == "group":
        return ternary_dequantize(unpack_ternary(packed), inv_scale, "group", group_size)
    return unpack_ternary(packed, torch.int8 if mode == "int8" else torch.float32)


# float32 holds every integer up to 2**24 exactly, and each partial sum of int8 codes (|c| <= 127) times
# ternary codes is such an integer while a row has at most this many inputs: in any summation order.
EXACT_FLOAT_INPUTS = (1 << 24) // 127
FLOAT_CHUNK = 1 << 22  # weight codes converted to float32 at a time (16 MiB): the copy stays small
_int_mm_faster: bool | None = None  # decided once per process, on the first product
_warned_inputs: set[int] = set()


def _float_matmul(codes_x: torch.Tensor, codes_w: torch.Tensor) -> torch.Tensor:
    x = codes_x.float()
    rows = max(1, FLOAT_CHUNK // codes_w.shape[1])
    if rows >= codes_w.shape[0]:
        return x @ codes_w.float().t()
    return torch.cat([x @ codes_w[i:i + rows].float().t() for i in range(0, codes_w.shape[0], rows)], dim=-1)


def _int_mm(codes_x: torch.Tensor, codes_w: torch.Tensor) -> torch.Tensor | None:
    """``torch._int_mm`` as float32, or None where this torch has no CPU int8 matmul."""
    try:
        return torch._int_mm(codes_x, codes_w.t()).float()
    except (RuntimeError, AttributeError, NotImplementedError) as err:
        log.debug("torch._int_mm unavailable on CPU (%s)", err)
        return None


def _int_mm_is_faster(codes_x: torch.Tensor, codes_w: torch.Tensor) -> bool:
    """Times torch's int8 matmul against float32 sgemm on these operands (best of three each). It depends
    on the CPU: on one machine the int8 kernel was ~2x faster on SmolLM2's projections; on an AVX2 machine
    1.1-2x slower at one token and 14-23x at 64 (benchmarks/results/cpu_int8_products.md)."""
    def best(product) -> float:
        times = []
        for _ in range(4):
            start = time.perf_counter()
            product(codes_x, codes_w)
            times.append(time.perf_counter() - start)
        return min(times[1:])  # the first call pays for allocations and kernel selection

    if _int_mm(codes_x, codes_w) is None:
        return False
    faster = best(_int_mm) < best(_float_matmul)
    log.debug("CPU int8 products: %s", "torch._int_mm" if faster else "float32 sgemm of the codes")
    return faster


def _int_matmul(codes_x: torch.Tensor, codes_w: torch.Tensor) -> torch.Tensor:
    """Exact ``codes_x · codes_wᵀ`` (int8 codes) as float32, by whichever of torch's int8 matmul and float32
    sgemm (on the codes converted a block of rows at a time) is faster on this CPU. Rows longer than
    EXACT_FLOAT_INPUTS could round in float32, so they take the int8 matmul wherever torch has it."""
    global _int_mm_faster
    if codes_x.shape[-1] > EXACT_FLOAT_INPUTS:
        out = _int_mm(codes_x, codes_w)
        if out is not None:
            return out
        if codes_x.shape[-1] not in _warned_inputs:
            _warned_inputs.add(codes_x.shape[-1])
            log.warning("no int8 matmul on this CPU: rows of %d inputs sum in float32, which may round",
                        codes_x.shape[-1])
        return _float_matmul(codes_x, codes_w)
    if _int_mm_faster is None:
        _int_mm_faster = _int_mm_is_faster(codes_x, codes_w)
    if _int_mm_faster:
        out = _int_mm(codes_x, codes_w)
        if out is not None:
            return out
    return _float_matmul(codes_x, codes_w)


def _cpu_linear(x, packed, inv_scale, bias, granularity, group_size, cache: TernaryCache):
    weight = cache.cpu_weight(packed, inv_scale, granularity, group_size)
    codes_x, x_inv = int8_absmax_quantize(x)
    if granularity == "group":
        y = (codes_x.float() @ weight.t()) / x_inv
    else:
        if weight.dtype == torch.int8:
            lead = codes_x.shape[:-1]
            acc = _int_matmul(codes_x.reshape(-1, codes_x.shape[-1]), weight).reshape(*lead, -1)
        else:
            acc = codes_x.float() @ weight.t()
        y = acc / (x_inv * inv_scale.float().reshape(-1))
    y = y.to(x.dtype)
    return y if bias is None else y + bias


_triton_ok: bool | None = None


def triton_available() -> bool:
    """Is triton importable here (checked once)? CPU-only installs usually lack it."""
    global _triton_ok
    if _triton_ok is None:
        _triton_ok = importlib.util.find_spec("triton") is not None
        if _triton_ok:
            try:
                import bitconvert.kernels.triton_ternary  # noqa: F401
            except Exception as err:  # a broken triton must not break inference: the reference still works
                log.warning("triton is installed but the kernels failed to import (%s); using the torch path", err)
                _triton_ok = False
    return _triton_ok


class _LastActivations(threading.local):
    """The quantized activations of the last input, reused when the next layer gets the very same
    tensor (q/k/v projections, gate/up projections): one quantization kernel instead of three. (When the
    tuner picked the fused GEMV for a shape, nothing is kept: each of those layers quantizes inside.)

    Identity, not address: a weak reference to the tensor object plus its version counter, so a
    freed tensor or an in-place change never matches. Eager mode only: code compiled by inductor hands
    one buffer object to several products in turn and rewrites it from its kernels, which bump no
    version counter, so there a stale entry could match (the custom operators pass ``reuse=False``).
    """

    entry: tuple | None = None

    def get(self, x: torch.Tensor):
        if self.entry is not None:
            ref, version, shape, acts = self.entry
            if ref() is x and x._version == version and x.shape == shape:
                return acts
        return None

    def put(self, x: torch.Tensor, acts) -> None:
        self.entry = (weakref.ref(x), x._version, x.shape, acts)


_last_activations = _LastActivations()


def _cuda_linear(x, packed, inv_scale, bias, granularity, group_size, acts=None, dtype=None, swiglu=False,
                 reuse=True, residual=None, absmax_parts=None):
    """The Triton product of ``x`` (or of its int8 codes, when ``acts`` holds their quantization; then
    ``dtype`` is the result's), plus ``residual`` if given, or None when no kernel covers it. ``reuse``: may
    share quantized activations with the layer before (:class:`_LastActivations`). ``absmax_parts``: see
    :func:`ternary_linear`."""
    from bitconvert.kernels import triton_ternary as tt

    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    dtype = dtype or x.dtype
    separate_bias = bias is not None and bias.dtype != dtype  # torch would promote: keep its rule
    if separate_bias and swiglu:
        return None
    keep = None
    if acts is None and reuse:
        # Activations another layer quantized from this very tensor are reused; otherwise the tuner picks
        # between the fused GEMV (quantizes inside, keeps nothing) and quantizing once here, kept for the next.
        acts = _last_activations.get(x)

        def keep(quantized):
            _last_activations.put(x, quantized)

    res2d = None
    if residual is not None and not separate_bias and not swiglu and residual.dtype == dtype:
        res2d = residual.reshape(-1, residual.shape[-1])
        if res2d.stride(-1) != 1:
            res2d = res2d.contiguous()
    parts = None  # the row maxima, if they are what the kernel takes: (M, P) float32 on this device, contiguous
    if (absmax_parts is not None and acts is None and x2d.shape[0] and absmax_parts.dtype == torch.float32
            and absmax_parts.device == x2d.device and absmax_parts.numel() % x2d.shape[0] == 0):
        parts = absmax_parts.reshape(x2d.shape[0], -1)
        parts = parts if parts.is_contiguous() else None
    y = tt.ternary_matmul(x2d, packed, inv_scale, None if separate_bias else bias, tt.SCALE_MODES[granularity],
                          group_size, acts=acts, keep_acts=keep, out_dtype=dtype, swiglu=swiglu, residual=res2d,
                          parts=parts)
    if y is None:
        return None
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    if separate_bias:
        y = y + bias
    return residual + y if residual is not None and res2d is None else y


class _Reference(threading.local):
    depth = 0


_reference = _Reference()


@contextmanager
def reference_kernels():
    """Inside the block (this thread), every product and the decode attention take the torch reference, as
    ``BITCONVERT_KERNELS=reference`` makes them do everywhere."""
    _reference.depth += 1
    try:
        yield
    finally:
        _reference.depth -= 1


def _reference_only() -> bool:
    return _reference.depth > 0 or os.environ.get("BITCONVERT_KERNELS", "auto") == "reference"


def _weights_eligible(device, packed, inv_scale, bias) -> bool:
    return (packed.dtype == torch.uint8 and packed.is_contiguous() and packed.device == device
            and inv_scale.device == device and inv_scale.dtype == torch.float32 and inv_scale.is_contiguous()
            and (bias is None or bias.device == device) and not _reference_only())


def _kernel_eligible(x, packed, inv_scale, bias) -> bool:
    return (x.dtype in _KERNEL_DTYPES and not (torch.is_grad_enabled() and x.requires_grad)
            and _weights_eligible(x.device, packed, inv_scale, bias))


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, inv_scale: torch.Tensor, bias: torch.Tensor | None = None,
                   *, granularity: str = "tensor", group_size: int = 128,
                   cache: TernaryCache | None = None, swiglu: bool = False, reuse: bool = True,
                   residual: torch.Tensor | None = None, absmax_parts: torch.Tensor | None = None) -> torch.Tensor:
    """``y = dequant(int8(x)) · dequant(W)ᵀ + b`` for W packed 2 bits a weight (transformers' bitnet layout).

    ``packed`` is uint8 ``(out / 4, in)``, ``inv_scale`` the float32 inverse scale of shape ``(1,)``,
    ``(out,)`` or ``(out, in / group_size)``. ``cache`` (optional, one per weight) lets the CPU
    path keep the unpacked weight; ``BITCONVERT_KERNELS=reference`` forces the reference everywhere.
    ``swiglu``: W's rows are a SwiGLU MLP's gate and up projections stacked, and the result is
    ``silu(gate) * up`` (``out / 2`` features), computed in the kernel's epilogue on CUDA. ``reuse``: on CUDA,
    a layer that gets the very tensor the layer before got reuses its quantized activations (eager mode).
    ``residual``: return ``residual + y`` (a decoder layer's residual stream; on CUDA added in the kernel).
    ``absmax_parts``: float32, one row per token of ``x``, whose maximum is that token's ``max |x|`` (written by
    the kernel that made ``x``, such as the decode attention); a batch-1 GEMV that quantizes ``x`` itself then
    reads them instead of a pass over ``x``. A hint only: every path computes the same result without it.
    """
    if x.is_cuda and _kernel_eligible(x, packed, inv_scale, bias) and triton_available():
        y = _cuda_linear(x, packed, inv_scale, bias, granularity, group_size, swiglu=swiglu, reuse=reuse,
                         residual=residual, absmax_parts=absmax_parts)
        if y is not None:
            return y
    elif (x.device.type == "cpu" and cache is not None and cache.cpu != "none" and packed.device == x.device
          and not _reference_only()):
        y = _cpu_linear(x, packed, inv_scale, bias, granularity, group_size, cache)
        return _plus(residual, swiglu_reference(y) if swiglu else y)
    return _plus(residual, ternary_linear_reference(x, packed, inv_scale, bias, granularity=granularity,
                                                    group_size=group_size, swiglu=swiglu))


def _plus(residual: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return y if residual is None else residual + y


# torch.compile sees the packed product as one opaque operator: dynamo cannot trace the dispatch above
# (environment lookups, weak references, the tuner), and inductor must not try to fuse into the Triton
# kernels. Inside, the call takes the same path as eager, except for the CPU cache (out of reach) and the
# reuse of quantized activations between layers (unsafe with inductor's reused buffers, see _LastActivations).
@torch.library.custom_op("bitconvert::ternary_linear", mutates_args=(),
                         schema="(Tensor x, Tensor packed, Tensor inv_scale, Tensor? bias, str granularity, "
                                "int group_size, bool swiglu=False, Tensor? residual=None, "
                                "Tensor? absmax_parts=None) -> Tensor")
def ternary_linear_op(x, packed, inv_scale, bias, granularity, group_size, swiglu=False, residual=None,
                      absmax_parts=None):
    return ternary_linear(x, packed, inv_scale, bias, granularity=granularity, group_size=group_size, swiglu=swiglu,
                          reuse=False, residual=residual, absmax_parts=absmax_parts)


@ternary_linear_op.register_fake
def _ternary_linear_shape(x, packed, inv_scale, bias, granularity, group_size, swiglu=False, residual=None,
                          absmax_parts=None):
    return x.new_empty((*x.shape[:-1], packed.shape[0] * (2 if swiglu else 4)))


# Under torch.compile the activation quantizer may also be plain torch ops (absmax, scale, round), which
# inductor fuses into the kernel that produces x (an RMSNorm, SiLU·up); the packed product then gets
# the int8 codes and skips its own quantizer. Off: on an H200 it did not pay (benchmarks/bench_kernels.py,
# variant packed_fused_prequant; results/kernels-h200-prequant.md).
def quantize_for_kernels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BitNet's per-token int8 activations as the kernels take them: codes ``(..., K)`` int8, ``127 / absmax``
    ``(...,)`` float32 and Σ codes ``(...,)`` int32 (what the kernels subtract for their ``code + 1`` trick)."""
    codes, inv = int8_absmax_quantize(x)
    return codes, inv.squeeze(-1), codes.sum(-1, dtype=torch.int32)


def ternary_linear_quantized(codes: torch.Tensor, x_inv: torch.Tensor, x_sum: torch.Tensor, packed: torch.Tensor,
                             inv_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                             granularity: str = "tensor", group_size: int = 128,
                             dtype: torch.dtype = torch.bfloat16, swiglu: bool = False,
                             residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`ternary_linear` for activations quantized already (:func:`quantize_for_kernels`): the same
    result as ``ternary_linear(x, ...)`` on the ``x`` they came from, in ``dtype``."""
    k = codes.shape[-1]
    if (codes.is_cuda and dtype in _KERNEL_DTYPES and k % 4 == 0 and _weights_eligible(codes.device, packed, inv_scale, bias)
            and triton_available()):
        codes = codes.contiguous()
        acts = (codes.reshape(-1, k), x_inv.reshape(-1).float().contiguous(), x_sum.reshape(-1).to(torch.int32).contiguous())
        y = _cuda_linear(codes, packed, inv_scale, bias, granularity, group_size, acts=acts, dtype=dtype, swiglu=swiglu,
                         residual=residual)
        if y is not None:
            return y
    y = quantized_linear_reference(codes, x_inv.unsqueeze(-1).float(), unpack_ternary(packed), inv_scale, bias,
                                   granularity=granularity, group_size=group_size, dtype=dtype)
    return _plus(residual, swiglu_reference(y) if swiglu else y)


@torch.library.custom_op("bitconvert::ternary_linear_quantized", mutates_args=(),
                         schema="(Tensor codes, Tensor x_inv, Tensor x_sum, Tensor packed, Tensor inv_scale, "
                                "Tensor? bias, str granularity, int group_size, ScalarType dtype, bool swiglu=False, "
                                "Tensor? residual=None) -> Tensor")
def ternary_linear_quantized_op(codes, x_inv, x_sum, packed, inv_scale, bias, granularity, group_size, dtype,
                                swiglu=False, residual=None):
    return ternary_linear_quantized(codes, x_inv, x_sum, packed, inv_scale, bias, granularity=granularity,
                                    group_size=group_size, dtype=dtype, swiglu=swiglu, residual=residual)


@ternary_linear_quantized_op.register_fake
def _ternary_linear_quantized_shape(codes, x_inv, x_sum, packed, inv_scale, bias, granularity, group_size, dtype,
                                    swiglu=False, residual=None):
    return codes.new_empty((*codes.shape[:-1], packed.shape[0] * (2 if swiglu else 4)), dtype=dtype)


def rms_norm_quantize_reference(x: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' RMSNorm (``weight * (x * rsqrt(mean(x²) + eps))``, statistics in float32, the
    normalised ``x`` rounded to its dtype first) and :func:`quantize_for_kernels` of the result."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = weight * h.to(x.dtype)
    return (normed, *quantize_for_kernels(normed))


def rms_norm_quantize(x: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An RMSNorm and the int8 activations of its output for the packed products that read it, in one kernel
    on CUDA: ``(normed, codes, 127 / absmax, Σ codes)``, as :func:`rms_norm_quantize_reference` computes them
    (on CUDA up to float32 rounding in the statistics)."""
    if (x.is_cuda and x.dtype in _KERNEL_DTYPES and weight.device == x.device and weight.dtype in _KERNEL_DTYPES
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not _reference_only() and triton_available()):
        from bitconvert.kernels import triton_ternary as tt

        k = x.shape[-1]
        x2d = x.reshape(-1, k)
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        out = tt.rms_norm_quantize(x2d, weight, eps)
        if out is not None:
            normed, (codes, inv, total) = out
            lead = x.shape[:-1]
            return normed.reshape(*lead, k), codes.reshape(*lead, k), inv.reshape(lead), total.reshape(lead)
    return rms_norm_quantize_reference(x, weight, eps)


@torch.library.custom_op("bitconvert::rms_norm_quantize", mutates_args=(),
                         schema="(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor, Tensor, Tensor)")
def rms_norm_quantize_op(x, weight, eps):
    return rms_norm_quantize(x, weight, eps)


@rms_norm_quantize_op.register_fake
def _rms_norm_quantize_shape(x, weight, eps):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty(lead, dtype=torch.float32), x.new_empty(lead, dtype=torch.int32))
