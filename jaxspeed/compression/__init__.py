"""Compression: quantizers with STE, integer weights and matmuls, QAT, ZeroQuant, XTC, N:M,
MiLo (INT3 experts with low-rank compensators)."""

from jaxspeed.compression.integer import (
    QuantizedWeight,
    int8_matmul,
    pack_int4,
    quantize_to_int,
    quantize_tokens_int8,
    quantized_matmul,
    tree_nbytes,
    unpack_int4,
)
from jaxspeed.compression.milo import MiloConfig, MiloExperts, MiloWeight, compress_experts
from jaxspeed.compression.quantizers import (
    asymmetric_codes,
    ema_range,
    quantize,
    quantize_asymmetric,
    quantize_binary,
    quantize_static,
    quantize_symmetric,
    quantize_ternary,
    quantize_tokenwise,
    quantize_weight,
    ste,
)

__all__ = [
    "MiloConfig",
    "MiloExperts",
    "MiloWeight",
    "QuantizedWeight",
    "asymmetric_codes",
    "compress_experts",
    "ema_range",
    "int8_matmul",
    "pack_int4",
    "quantize",
    "quantize_asymmetric",
    "quantize_binary",
    "quantize_static",
    "quantize_symmetric",
    "quantize_ternary",
    "quantize_to_int",
    "quantize_tokens_int8",
    "quantize_tokenwise",
    "quantize_weight",
    "quantized_matmul",
    "ste",
    "tree_nbytes",
    "unpack_int4",
]
