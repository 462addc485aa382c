"""Linear layers with an optional oneDNN-packed weight for float32 on CPU.

PyTorch's default CPU matmul (MKL sgemm) reaches well under this CPU's float32 peak at the
decode shapes (M = 8..32 rows, K = hidden size); a weight reordered once into oneDNN's blocked
layout runs them 1.1-4.6x faster (`bench/linear_kernels.py`; small projections at M = 1 are
slower, but the large ones, which dominate, are faster there too). Packing is
a load-time step: the dense weight is then dropped (kept only as a shape on the meta device), so
memory does not double. Tied weights stay dense because the embedding reads them.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from server.errors import UnsupportedModelError

if TYPE_CHECKING:
    from adapters.lora_layer import LoraBatch, LoraSlots


def onednn_packing_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# Packed weights by handle. Inductor cannot take a oneDNN (opaque layout) tensor as a graph
# input, so a compiled step reaches them through this opaque op: the graph sees a small handle
# tensor (an input like any weight, so every layer shares one graph) and a result of known shape.
# Weak values: a model that goes away takes its packed weights with it.
_PACKED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("loraswap::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[int(handle)], bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, handle: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class Linear(nn.Linear):
    """nn.Linear plus an optional packed weight and optional LoRA slots (attached by the SlotBank)."""

    packed: torch.Tensor | None
    quantized: nn.Module | None
    lora: LoraSlots | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.packed = None
        self.quantized = None
        self.lora = None
        self._norms_sq: torch.Tensor | None = None  # [out] float64, DoRA's ||W_i||^2 (weight_norms_sq)

    def quantize(self, method: str, device: torch.device | None = None) -> None:
        """Replace the weight by a bitsandbytes copy quantized on its device: `int8` (LLM.int8(),
        per-row scales, outlier threshold 6.0 as transformers uses) or `nf4` / `fp4` (blocks of 64,
        no double quantization, so a fused projection quantizes exactly like its separate parts).
        The LoRA delta stays in the compute dtype on top. The dense weight is dropped. `device`:
        where the quantized copy goes (default: where the weight is)."""
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UnsupportedModelError(
                f"--quantization {method} needs bitsandbytes: pip install 'loraswap[quant]'"
            ) from exc

        weight = self.weight.detach()
        device, dtype = device or weight.device, weight.dtype
        has_bias = self.bias is not None
        module: nn.Module
        if method == "int8":
            module = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=has_bias,
                                         has_fp16_weights=False, threshold=6.0)
            module.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        elif method in ("nf4", "fp4"):
            module = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=has_bias, compute_dtype=dtype,
                                       compress_statistics=False, quant_type=method)
            module.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, compress_statistics=False,
                                              quant_type=method, module=module)
            keep_compute_dtype(module)
        else:
            raise ValueError(f"unknown quantization {method!r}")
        if has_bias:
            module.bias = nn.Parameter(self.bias.detach().cpu(), requires_grad=False)  # type: ignore[union-attr]
        self.quantized = module.to(device)  # bitsandbytes quantizes on the move to the device
        self.weight = nn.Parameter(weight.to("meta"), requires_grad=False)

    def pack(self, *, batch_hint: int, keep_dense: bool = False) -> None:
        """Reorder the weight for oneDNN (float32, CPU). `batch_hint`: typical rows per call."""
        weight = self.weight.detach()
        if self.quantized is not None or weight.device.type != "cpu" or weight.dtype != torch.float32:
            return
        self._norms_sq = weight.double().pow(2).sum(1)  # the dense weight is about to go
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        handle = next(_HANDLES)
        _PACKED[handle] = self.packed
        self.register_buffer("handle", torch.tensor(handle), persistent=False)
        if not keep_dense:
            self.weight = nn.Parameter(weight.to("meta"), requires_grad=False)

    @property
    def device(self) -> torch.device:
        """Where the projection computes (a packed or quantized weight leaves `weight` on meta)."""
        if self.packed is not None:
            return self.packed.device
        if self.quantized is not None:
            return next(self.quantized.parameters()).device
        return self.weight.device

    def computed_weight(self) -> torch.Tensor:
        """The weight # [out, in] this layer multiplies by, in the compute dtype: the dense one,
        or a quantized one dequantized (a fresh tensor). Not for a packed layer."""
        if self.quantized is not None:
            return dequantize(self.quantized.weight).to(self.weight.dtype)
        if self.packed is not None:
            raise RuntimeError("a packed layer keeps no dense weight")
        return self.weight.detach()

    def weight_norms_sq(self) -> torch.Tensor:
        """||W_i||^2 of every output row # [out] float64 (DoRA's norms), computed once."""
        if self._norms_sq is None:
            self._norms_sq = self.computed_weight().double().pow(2).sum(1)
        return self._norms_sq

    def weight_product(self, a: torch.Tensor) -> torch.Tensor:
        """a # [r, in] -> a W^T # [r, out], without the bias, as the layer computes it."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(a.float(), self.packed, None, "none", [], "")
        weight = self.computed_weight()
        return a.to(weight.dtype) @ weight.t()

    def weight_bytes(self) -> int:
        """Bytes the projection's weight and bias take in the form used at run time."""
        if self.quantized is not None:
            return sum(tensor_bytes(p) + _quant_state_bytes(p) for p in self.quantized.parameters())
        weight = self.packed if self.packed is not None else self.weight
        bias = 0 if self.bias is None else tensor_bytes(self.bias)
        return tensor_bytes(weight) + bias

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        if self.packed is not None and torch.compiler.is_compiling():
            y = packed_linear(x, self.handle, self.bias, self.out_features)
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        elif self.quantized is not None:
            y = self.quantized(x)
        else:
            y = F.linear(x, self.weight, self.bias)
        if lora is not None and self.lora is not None:
            y = self.lora.add_to(y, x, lora, self.quantized.bias if self.quantized is not None else self.bias)
        return y


def keep_compute_dtype(module: nn.Module) -> None:
    """Make a bitsandbytes Linear4bit compute in its compute_dtype on every CPU.

    bitsandbytes 0.50 repacks a 4-bit weight at its first forward on a CPU with AVX512-BF16 and
    then computes in bfloat16 whatever compute_dtype says; the repacking reshapes the block
    scales to [out, in // 64], so a projection whose input size is not a multiple of 64 crashes
    there, eager or compiled. With the repacking off, such a host dequantizes and multiplies in
    the compute dtype as an AVX2 host does: the same numbers everywhere, any shape."""
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def dequantize(param: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes weight as the float32 matrix # [out, in] its layer multiplies by (what
    PEFT's DoRA reads too): LLM.int8() rows times their scales / 127, or 4-bit blocks decoded."""
    import bitsandbytes as bnb

    state = getattr(param, "quant_state", None)
    if state is not None:
        return bnb.functional.dequantize_4bit(param.data, state).float()
    scales = getattr(param, "SCB", None)
    if scales is None:
        raise RuntimeError("not a bitsandbytes weight")
    return param.data.float() * (scales.float()[:, None] / 127.0)


def tensor_bytes(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.numel() * t.element_size()


def _quant_state_bytes(param: torch.Tensor) -> int:
    """The scales bitsandbytes keeps beside a quantized weight (int8 row scales, 4-bit absmax)."""
    extra = [getattr(param, "SCB", None)]
    state = getattr(param, "quant_state", None)
    if state is not None:
        extra += [state.absmax, state.code]
    return sum(tensor_bytes(t) for t in extra if isinstance(t, torch.Tensor))
