"""Weight-only quantisation of the decoder, in one package, applied to a finished model from outside.

- :mod:`.formats`: the packed layout of the CPU kernel, the int8 / int4 quantisers and the lossless
  GGUF Q8_0 / Q4_0 / Q4_1 repacker;
- :mod:`.cpu_linear`: :class:`QuantLinear` and its fused form over ``cpp_ext/qgemm.cpp`` (kernel sets
  picked per CPU at run time: AVX-512 VNNI, AVX-VNNI, NEON dotprod, portable), beside
  :func:`qgemm_reference`, their float64 oracle;
- :mod:`.triton_linear`: :class:`TritonInt4Linear` over the Triton int4 kernel for CUDA decoding;
- :mod:`.apply`: :func:`quantize_decoder` and the summaries ``edgevlm info`` prints;
- :mod:`.fused_decode`: :class:`FusedDecodeStep`, a whole batch-1 decode step (or prompt) of a
  CPU-quantised decoder in one C++ call (``cpp_ext/decode_step.cpp``), what a Pipeline runs on CPU.

Nothing in :mod:`edgevlm.runtime.decoder` knows about any of it. ONNX graph quantisation of the
exported vision tower is a different operation and lives in :mod:`edgevlm.export.onnx_precision`.
"""

from .apply import describe, quantize_decoder, summary
from .cpu_linear import (FusedQuantLinear, QuantLinear, QuantSlice, cpu_kernel_info, cpu_kernels, kernel_threads,
                         qgemm_reference, quantize_activations)
from .formats import (ACT_BLOCK, LANES, Packed, dequantize, from_gguf, gguf_packable, pack_int4_codes,
                      pack_int8_codes, quantize_int4, quantize_int8, unlanes, unpack_codes)
from .fused_decode import FusedDecodeStep
from .triton_linear import TritonInt4Linear, pack_for_triton, swap_linears_for_triton

__all__ = ["quantize_decoder", "summary", "describe", "Packed", "quantize_int8", "quantize_int4", "from_gguf",
           "gguf_packable", "pack_int8_codes", "pack_int4_codes", "unpack_codes", "unlanes", "dequantize", "LANES",
           "ACT_BLOCK", "QuantLinear", "FusedQuantLinear", "QuantSlice", "qgemm_reference", "quantize_activations",
           "cpu_kernels", "cpu_kernel_info", "kernel_threads", "TritonInt4Linear", "pack_for_triton", "swap_linears_for_triton",
           "FusedDecodeStep"]
