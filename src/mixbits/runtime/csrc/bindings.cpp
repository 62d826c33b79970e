#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nibble_linear", &nibble_linear, "x @ W.T for 4-bit codes");
  m.def("byte_linear", &byte_linear, "x @ W.T for 8-bit codes");
  m.def("nibble_dequantize", &nibble_dequantize, "W from 4-bit codes");
  m.def("byte_dequantize", &byte_dequantize, "W from 8-bit codes");
  m.def("vectorized", &vectorized, "whether the AVX2 path was compiled");
  m.def("vector_linear", &vector_linear, "x @ W.T for vector-codebook codes, from tables of codeword dot products");
  m.def("trellis_viterbi", &trellis_viterbi, "the best walk through a bit-shift trellis for each sequence");
  m.def("trellis_linear", &trellis_linear, "x @ W.T for trellis-coded rows, from their bit streams");
  m.def("trellis_dequantize", &trellis_dequantize, "the weights of trellis-coded rows");
  m.def("quantize_rows", &quantize_rows, "float32 rows to int8 codes in blocks, their scales and sums per 16 inputs");
  m.def("nibble_xlinear", &nibble_xlinear, "float32 rows quantized to int8, times 4-bit codes");
  m.def("byte_xlinear", &byte_xlinear, "float32 rows quantized to int8, times 8-bit codes");
  m.def("table_xlinear", &table_xlinear, "float32 rows quantized to int8, times 4-bit codes of a table per row and group");
  m.def("qdot_isa", &qdot_isa, "the instruction set the integer-dot kernels use");
  m.def("set_qdot_isa", &set_qdot_isa, "use the integer-dot kernels of another instruction set (avx2, avxvnni, avx512vnni)");
  m.def("rms_norm", &rms_norm, "RMSNorm of float32 rows");
  m.def("attend", &attend, "RoPE, KV-cache append and causal grouped-query attention for new tokens");
  m.def("silu_mul", &silu_mul, "silu(gate) * up for [gate | up] rows");
  m.def("kv_scores", &kv_scores, "queries times every key of a quantized KV store, from its packed codes");
  m.def("kv_mix", &kv_mix, "attention weights times every value of a quantized KV store, from its packed codes");
  m.def("kv_encode", &kv_encode, "new tokens' codes and parameters in a per-token integer KV store, packed in place");
}
