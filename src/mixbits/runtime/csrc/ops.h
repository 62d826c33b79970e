// The functions mixbits compiles into its native extension (see bindings.cpp).
#pragma once
#include <torch/extension.h>

// intgemm.cpp: matrix products with integer-coded weights.
at::Tensor nibble_linear(at::Tensor x, at::Tensor codes, at::Tensor scales, at::Tensor offsets, int64_t group);
at::Tensor byte_linear(at::Tensor x, at::Tensor codes, at::Tensor scales, at::Tensor offsets, int64_t group);
at::Tensor nibble_dequantize(at::Tensor codes, at::Tensor scales, at::Tensor offsets, int64_t group);
at::Tensor byte_dequantize(at::Tensor codes, at::Tensor scales, at::Tensor offsets, int64_t group);
bool vectorized();

// vector.cpp: matrix products with vector-codebook weights, from tables of codeword dot products.
at::Tensor vector_linear(at::Tensor x, at::Tensor codes, at::Tensor books, at::Tensor scales, int64_t group);

// trellis.cpp: the Viterbi search of trellis codes, and products and weights from their bit streams.
at::Tensor trellis_viterbi(at::Tensor target, at::Tensor weight, at::Tensor table, int64_t step_bits, at::Tensor start);
at::Tensor trellis_linear(at::Tensor x, at::Tensor streams, at::Tensor scales, at::Tensor table, int64_t step_bits,
                          int64_t offset);
at::Tensor trellis_dequantize(at::Tensor streams, at::Tensor scales, at::Tensor table, int64_t step_bits, int64_t offset,
                              int64_t cols);

// qdot.cpp: int8-quantized activations times integer-coded weights, in integer arithmetic.
std::vector<at::Tensor> quantize_rows(at::Tensor x, int64_t block, int64_t bits, double fixed);
at::Tensor nibble_xlinear(at::Tensor x, int64_t block, int64_t bits, double fixed, at::Tensor codes, at::Tensor scales,
                          c10::optional<at::Tensor> offsets, int64_t group, int64_t n, double center, double unit,
                          c10::optional<at::Tensor> table);
at::Tensor byte_xlinear(at::Tensor x, int64_t block, int64_t bits, double fixed, at::Tensor codes, at::Tensor scales,
                        c10::optional<at::Tensor> offsets, int64_t group, int64_t n, double center);
at::Tensor table_xlinear(at::Tensor x, int64_t block, int64_t bits, double fixed, at::Tensor codes, at::Tensor tables,
                         at::Tensor units, int64_t group);
std::string qdot_isa();
void set_qdot_isa(std::string isa);

// decode_ops.cpp: the steps of a decoder block between its matrix products.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
at::Tensor attend(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor keys, at::Tensor values, int64_t start,
                  int64_t heads, int64_t kv_heads, double scale);
at::Tensor silu_mul(at::Tensor gate_up);

// kv_cache.cpp: attention scores and value mixing over a quantized KV cache, from its packed codes; new tokens
// encoded into it.
at::Tensor kv_scores(at::Tensor query, at::Tensor codes, at::Tensor scale, at::Tensor offset, int64_t tokens,
                     int64_t width, int64_t token_group, int64_t group);
at::Tensor kv_mix(at::Tensor weights, at::Tensor codes, at::Tensor scale, at::Tensor offset, int64_t tokens,
                  int64_t width, int64_t token_group, int64_t group, int64_t dim);
void kv_encode(at::Tensor x, at::Tensor codes, at::Tensor scale, at::Tensor zero, int64_t first, int64_t width,
               int64_t group, bool symmetric);
