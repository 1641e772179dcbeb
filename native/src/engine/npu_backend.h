// The NPU backend interface: a C struct of function pointers (as ggml's backends), through which the
// two-lane prefill scheduler runs every W8A8 GEMM of the "NPU lane". The laptop implementation
// (cpu_int8_backend) is the int8 CPU executor (kernels::w8a8_gemm on the NPU lane's own threads).
//
// Where a real NPU plugs in (README "Scheduler"):
//   * QNN (Qualcomm HTP): upload_w8a8 builds a QNN graph per (linear, chunk_size) with a static-shape
//     int8 MatMul (weights as a QNN_DATATYPE_SFIXED_POINT_8 static tensor with per-channel scale, the
//     activation scale fixed from input_scale), finalizes it, and returns the graph handle; gemm copies the
//     quantized chunk (the codes the CPU lane produced, +128 offset removed) into the graph's input
//     tensor, executes it and writes float outputs. The shadow outliers stay on the CPU lane unchanged.
//   * NNAPI: the same with an ANeuralNetworksModel of one FULLY_CONNECTED (TENSOR_QUANT8_ASYMM_SIGNED)
//     compiled per shape; gemm is an ANeuralNetworksExecution on the chunk.
// The contract is only: same codes in, y = float(int32 acc) * (s_a * s_w[n]) + bias out.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace edgemm {

struct NpuBackend {
  const char* name;
  void* ctx;
  // Registers a packed W8A8 weight with the device at load time; returns its handle (null = failure).
  void* (*upload_w8a8)(void* ctx, const kernels::W8A8Weights* w, const char* layer_name);
  // y[M, N] (row stride ldy) = int8 GEMM of the quantized activations with the uploaded weight, dequantized
  // (+ bias if non-null). Returns 0 on success. Called from the NPU lane's thread only.
  int32_t (*gemm)(void* ctx, void* weight, const kernels::W8A8Act* act, const float* bias, float* y, int64_t ldy);
  // Releases a handle from upload_w8a8.
  void (*release)(void* ctx, void* weight);
};

// The int8 CPU executor as an NPU backend; ctx is the NPU lane's ThreadPool* (may be null).
NpuBackend cpu_int8_backend(ThreadPool* lane_pool);

}  // namespace edgemm
