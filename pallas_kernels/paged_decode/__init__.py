"""Paged decode attention for GPU (split-K, Pallas Triton lowering) and KV quantization helpers."""

from pallas_kernels.paged_decode.pallas_triton import choose_num_splits, paged_decode, ragged_decode
from pallas_kernels.paged_decode.quant import dequantize_kv, quantize_kv, storage_dtype

__all__ = ["choose_num_splits", "dequantize_kv", "paged_decode", "quantize_kv", "ragged_decode",
           "storage_dtype"]
