"""Peer comparison for the native kernel benchmark, at the same shapes, in the same run.

    /work/venv/bin/python native/bench/peers_bench.py --bench native/build/bench/edgemm_kernel_bench \
        [--threads 1,2] [--reps 7] [--json out.json]

Prefill GEMMs (Qwen1.5-1.8B shapes, M = 128/256/512):
  * onnxruntime MatMulInteger (uint8 activations x int8 weights -> int32, no dequant epilogue)
  * onnxruntime dynamic-quantized MatMul (quantize_dynamic: DynamicQuantizeLinear + MatMulIntegerToFloat,
    i.e. per-call activation quantization + int8 GEMM + dequant, the closest peer to W8A8)
  * torch._int_mm (int8 x int8 -> int32), torch fp32 and bf16 matmul
Decode GEMVs (M = 1):
  * onnxruntime MatMulNBits (int4, block 32 / 128, accuracy_level 4 = int8 activations, its fastest CPU path)
  * torch fp32 / bf16 matvec
and, for each shape, the native benchmark (edgemm_kernel_bench --json --filter ...) right after the peers.
Timings: median of --reps repetitions, each looping for >= 60 ms.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPES = [("qkv", 2048, 6144), ("o_proj", 2048, 2048), ("gate_up", 2048, 11008), ("down", 5504, 2048)]


def timeit(fn, reps, min_s=0.06):
    fn()
    per = []
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            el = time.perf_counter() - t0
            if el >= min_s:
                break
        per.append(el / n)
    per.sort()
    return per[len(per) // 2]


def ort_session(model, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_matmulinteger(M, K, N, threads):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "az"], ["y"])],
        "mmi",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [M, K])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [M, N])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(128, np.uint8), "az")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort_session(m, threads)
    a = rng.integers(0, 256, (M, K)).astype(np.uint8)
    return lambda: sess.run(None, {"a": a})


def ort_dynamic_quant(M, K, N, threads):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
        [numpy_helper.from_array(w, "w")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        onnx.save(m, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        qm = onnx.load(dst)
    sess = ort_session(qm, threads)
    x = rng.standard_normal((M, K)).astype(np.float32)
    return lambda: sess.run(None, {"x": x})


def ort_matmulnbits(K, N, block, threads):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nb = K // block
    b = rng.integers(0, 256, (N, nb, block // 2)).astype(np.uint8)
    scales = (rng.random(N * nb) * 0.01 + 0.001).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                            block_size=block, accuracy_level=4)
    g = helper.make_graph(
        [node], "nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "s")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort_session(m, threads)
    x = rng.standard_normal((1, K)).astype(np.float32)
    bytes_read = b.nbytes + scales.nbytes + x.nbytes
    return (lambda: sess.run(None, {"x": x})), bytes_read


def torch_fns(M, K, N):
    import torch

    x = torch.randn(M, K)
    w = torch.randn(N, K) * 0.02
    xb, wb = x.bfloat16(), w.bfloat16()
    ai = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    bi = torch.randint(-127, 128, (K, N), dtype=torch.int8)
    fns = {
        "torch_fp32_matmul": lambda: torch.nn.functional.linear(x, w),
        "torch_bf16_matmul": lambda: torch.nn.functional.linear(xb, wb),
    }
    if M > 16:
        fns["torch_int_mm_int8"] = lambda: torch._int_mm(ai, bi)
    return fns


def native(bench, name_filter, threads, reps):
    if not bench:
        return []
    out = subprocess.run([bench, "--json", "--filter", name_filter, "--threads", str(threads), "--reps", str(reps)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["results"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default=None, help="path to edgemm_kernel_bench (adds the native rows)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    import torch

    rows = []

    def emit(kind, impl, shape, threads, sec, macs=None, nbytes=None):
        r = {"kind": kind, "impl": impl, "shape": shape, "threads": threads, "ms": sec * 1e3}
        if macs:
            r["GMAC/s"] = macs / sec / 1e9
        if nbytes:
            r["GB/s"] = nbytes / sec / 1e9
        rows.append(r)
        extra = "".join(f"  {k}={v:.4g}" for k, v in r.items() if k in ("GMAC/s", "GB/s"))
        print(f"{kind:8s} {impl:34s} {shape:24s} T={threads}  {r['ms']:9.3f} ms{extra}", flush=True)

    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, K, N in SHAPES:
            if not args.skip_prefill:
                for M in (128, 256, 512):
                    shape = f"M{M} K{K} N{N}"
                    macs = M * K * N
                    emit("prefill", "ort_MatMulInteger_u8s8", shape, threads,
                         timeit(ort_matmulinteger(M, K, N, threads), args.reps), macs)
                    emit("prefill", "ort_dynamic_quant_MatMul", shape, threads,
                         timeit(ort_dynamic_quant(M, K, N, threads), args.reps), macs)
                    for impl, fn in torch_fns(M, K, N).items():
                        emit("prefill", impl, shape, threads, timeit(fn, args.reps), macs)
                for r in native(args.bench, f"w8a8_gemm.{name}", threads, args.reps):
                    if r["name"].startswith("w8a8_gemm"):
                        emit("prefill", "edgemm_w8a8_gemm (native)", r["shape"], threads, r["median_ms"] / 1e3,
                             macs=float(r["GMAC/s"]) * r["median_ms"] / 1e3 * 1e9)
            if not args.skip_decode:
                shape = f"N{N} K{K}"
                for block in (32, 128):
                    fn, nbytes = ort_matmulnbits(K, N, block, threads)
                    emit("decode", f"ort_MatMulNBits_int4_b{block}_acc4", shape, threads, timeit(fn, args.reps),
                         nbytes=nbytes)
                for impl, fn in torch_fns(1, K, N).items():
                    if impl.startswith("torch_fp32"):
                        emit("decode", "torch_fp32_matvec", shape, threads, timeit(fn, args.reps), nbytes=N * K * 4)
                    elif impl.startswith("torch_bf16"):
                        emit("decode", "torch_bf16_matvec", shape, threads, timeit(fn, args.reps), nbytes=N * K * 2)
                for variant in ("int4_g32", "int4_g128", "sp24_int4_g128"):
                    for r in native(args.bench, f"gemv_hot.{variant}.{name}", threads, args.reps):
                        if r["name"].startswith("gemv_hot."):
                            emit("decode", f"edgemm_{variant} (native, hot)", r["shape"], threads,
                                 r["median_ms"] / 1e3, nbytes=r["MB_read"] * 1e6)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
