"""Cross-check of the native kernels against independent numpy implementations.

The numpy side is written from docs/formats.md and the Hugging Face conventions, not from the C++
reference, so it catches a shared misreading of a format (nibble order, rounding, RoPE pairing...).

    python numpy_crosscheck.py path/to/libedgemm_testcapi.so

Runs every check on every ISA the library reports; exits non-zero on failure.
"""

import ctypes
import math
import sys

import numpy as np

F32 = np.float32
P = ctypes.c_void_p
I64 = ctypes.c_int64


def ptr(a):
    return None if a is None else a.ctypes.data_as(P)


def load(path):
    lib = ctypes.CDLL(path)
    lib.etest_isa_name.restype = ctypes.c_char_p
    for name in ["w8a8_linear", "woq_int4", "woq_int8", "f32_linear", "rmsnorm", "layernorm", "softmax",
                 "act", "swiglu", "rope", "attention"]:
        getattr(lib, "etest_" + name).restype = ctypes.c_int
    return lib


FAILS = []


def check(name, got, want, atol, rtol):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    err = np.abs(got - want)
    ok = np.all(err <= atol + rtol * np.abs(want))
    if not ok:
        i = int(np.argmax(err - (atol + rtol * np.abs(want))))
        FAILS.append(f"{name}: max err {err.max():.3g} (at {i}: {got.flat[i]!r} vs {want.flat[i]!r})")
    return ok


def call(lib, fn, *args):
    conv = []
    for a in args:
        if isinstance(a, np.ndarray) or a is None:
            conv.append(ptr(a))
        elif isinstance(a, float):
            conv.append(ctypes.c_float(a))
        elif isinstance(a, int):
            conv.append(I64(a))
        else:
            conv.append(a)
    rc = getattr(lib, "etest_" + fn)(*conv)
    if rc != 0:
        FAILS.append(f"{fn} returned status {rc}")
    return rc


# ---------------------------------------------------------------------------------------------------
# Formats (docs/formats.md)
# ---------------------------------------------------------------------------------------------------
def int4_unpack(qweight, K):
    """uint8 [N, K/2] -> codes [N, K]: input k in byte k//2, low nibble when k is even."""
    lo = qweight & 0x0F
    hi = qweight >> 4
    out = np.empty((qweight.shape[0], K), dtype=np.int32)
    out[:, 0::2] = lo
    out[:, 1::2] = hi
    return out


def int4_pack(codes):
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def dequant(codes, scales_f16, zeros, G, sym_zero):
    """W = (code - zero) * scale; symmetric zero is 8 for int4, 0 for int8."""
    K = codes.shape[1]
    s = np.repeat(scales_f16.astype(np.float64), G, axis=1)[:, :K]
    z = np.repeat(zeros.astype(np.float64), G, axis=1)[:, :K] if zeros is not None else float(sym_zero)
    return (codes - z) * s


def act_quant(x, QB):
    """Weight-only kernels' activation contract: per block of QB, d = amax/127, q = rint(x * 127/amax)."""
    M, K = x.shape
    xb = x.reshape(M, K // QB, QB).astype(F32)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, F32(127.0) / amax, F32(0.0)).astype(F32)
    q = np.rint(xb * inv)  # float32 product, round half to even
    d = (amax / F32(127.0)).astype(F32)
    return (q * d).reshape(M, K)  # the activation the integer dot effectively sees


def act_block(G):
    return 128 if G % 128 == 0 else 64 if G % 64 == 0 else 32


# ---------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------
def check_w8a8(lib, rng, isa):
    M, K, N = 19, 200, 72
    s_a = 0.03
    x = rng.normal(0, 0.8, (M, K)).astype(F32)
    x[:, 5] *= 40  # outlier channel
    x[3, 100] = -50.0
    x[0, 0] = F32(2.5 * s_a)  # exact tie in float? (2.5*s_a)/s_a may not be exactly 2.5; fine either way
    qw = rng.integers(-127, 128, (N, K)).astype(np.int8)
    ws = rng.uniform(0.002, 0.02, N).astype(F32)
    bias = rng.normal(0, 1, N).astype(F32)
    codes_unclipped = np.rint(x / F32(s_a))  # x / s in float32, half to even
    codes = np.clip(codes_unclipped, -128, 127)
    clipped = codes != codes_unclipped
    wdq = qw.astype(np.float64) * ws[:, None]
    want_plain = (codes.astype(np.float64) @ qw.T.astype(np.float64)) * (np.float64(F32(s_a)) * ws) + bias
    resid = np.where(clipped, x - (codes * F32(s_a)).astype(F32), 0).astype(np.float64)
    want_shadow = want_plain + resid @ wdq.T
    for shadow, want in ((0, want_plain), (1, want_shadow)):
        y = np.zeros((M, N), F32)
        nout = ctypes.c_int64(0)
        call(lib, "w8a8_linear", x, M, K, s_a, qw, ws, bias, N, shadow, y, ctypes.byref(nout))
        check(f"[{isa}] w8a8 shadow={shadow}", y, want, 1e-4, 1e-5)
        if nout.value != int(clipped.sum()):
            FAILS.append(f"[{isa}] w8a8 outlier count {nout.value} != {int(clipped.sum())}")
    # Shadow result equals the float product up to the rounding of in-range activations.
    y = np.zeros((M, N), F32)
    call(lib, "w8a8_linear", x, M, K, s_a, qw, ws, bias, N, 1, y, ctypes.byref(ctypes.c_int64()))
    truth = x.astype(np.float64) @ wdq.T + bias
    bound = 0.5 * s_a * np.abs(wdq).sum(axis=1) + 1e-4
    if not np.all(np.abs(y - truth) <= bound):
        FAILS.append(f"[{isa}] w8a8+shadow deviates from the float product beyond the rounding bound")


def check_woq(lib, rng, isa):
    for G in (32, 128):
        for asym in (False, True):
            for sparse in (False, True):
                M, K, N = 3, 256, 40
                codes4 = rng.integers(0, 16, (N, K)).astype(np.int32)
                codes8 = rng.integers(-127, 128, (N, K)).astype(np.int32)
                z4 = rng.integers(0, 16, (N, K // G)).astype(np.uint8) if asym else None
                z8 = rng.integers(-10, 11, (N, K // G)).astype(np.int8) if asym else None
                if sparse:  # 2:4: zero two of every four (a zero weight has code == zero point)
                    keep = np.zeros((N, K), bool)
                    for j in range(0, K, 4):
                        idx = np.argsort(rng.random((N, 4)), axis=1)[:, :2]
                        keep[np.arange(N)[:, None], j + idx] = True
                    zp4 = np.repeat(z4.astype(np.int32), G, axis=1) if asym else 8
                    zp8 = np.repeat(z8.astype(np.int32), G, axis=1) if asym else 0
                    codes4 = np.where(keep, codes4, zp4)
                    codes8 = np.where(keep, codes8, zp8)
                scales = rng.uniform(0.002, 0.05, (N, K // G)).astype(np.float16)
                x = rng.normal(0, 1, (M, K)).astype(F32)
                bias = rng.normal(0, 1, N).astype(F32)
                QB = act_block(G)
                for fmt in ("int4", "int8"):
                    if fmt == "int4":
                        qw = int4_pack(codes4)
                        assert np.array_equal(int4_unpack(qw, K), codes4)
                        W = dequant(codes4, scales, z4, G, 8)
                        y = np.zeros((M, N), F32)
                        call(lib, "woq_int4", x, M, K, qw, scales.view(np.uint16), z4, G, bias, N, int(sparse), y)
                    else:
                        W = dequant(codes8, scales, z8, G, 0)
                        y = np.zeros((M, N), F32)
                        call(lib, "woq_int8", x, M, K, codes8.astype(np.int8), scales.view(np.uint16), z8, G,
                             bias, N, int(sparse), y)
                    tag = f"[{isa}] {fmt} G{G} {'asym' if asym else 'sym'}{' 2:4' if sparse else ''}"
                    # Exact contract: quantized activations times the dequantized weights.
                    want_q = act_quant(x, QB).astype(np.float64) @ W.T + bias
                    check(tag + " vs quantized-activation product", y, want_q, 1e-4, 1e-5)
                    # And within the activation-quantization error of the float product (int8 blocks of
                    # up to 128: ~0.7% rms of the output on Gaussian data).
                    want_f = x.astype(np.float64) @ W.T + bias
                    check(tag + " vs float product", y, want_f, 0.03 * np.abs(want_f).max(), 0)


def check_f32(lib, rng, isa):
    M, K, N = 37, 300, 70
    x = rng.normal(0, 1, (M, K)).astype(F32)
    W = rng.normal(0, 1, (N, K)).astype(F32)
    b = rng.normal(0, 1, N).astype(F32)
    y = np.zeros((M, N), F32)
    call(lib, "f32_linear", x, M, K, W, b, N, y)
    check(f"[{isa}] f32 gemm", y, x.astype(np.float64) @ W.T.astype(np.float64) + b, 1e-4, 1e-5)


def check_elementwise(lib, rng, isa):
    rows, dim = 4, 320
    x = (rng.normal(0, 2, (rows, dim)) + 0.5).astype(F32)
    w = rng.normal(0, 1, dim).astype(F32)
    b = rng.normal(0, 1, dim).astype(F32)
    y = np.zeros_like(x)
    call(lib, "rmsnorm", x, w, y, rows, dim, 1e-6)
    x64 = x.astype(np.float64)
    check(f"[{isa}] rmsnorm", y, x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-6) * w, 1e-6, 1e-5)
    call(lib, "layernorm", x, w, b, y, rows, dim, 1e-5)
    mu = x64.mean(1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(1, keepdims=True)
    check(f"[{isa}] layernorm", y, (x64 - mu) / np.sqrt(var + 1e-5) * w + b, 1e-5, 1e-5)
    s = x.copy()
    call(lib, "softmax", s, rows, dim)
    e = np.exp(x64 - x64.max(1, keepdims=True))
    check(f"[{isa}] softmax", s, e / e.sum(1, keepdims=True), 1e-9, 1e-5)
    t = np.linspace(-12, 12, 4001).astype(F32)
    t64 = t.astype(np.float64)
    out = np.zeros_like(t)
    call(lib, "act", 0, t, out, t.size)
    check(f"[{isa}] silu", out, t64 / (1 + np.exp(-t64)), 1e-30, 3e-6)
    call(lib, "act", 1, t, out, t.size)
    erfc = np.vectorize(math.erfc)
    check(f"[{isa}] gelu(erf)", out, 0.5 * t64 * erfc(-t64 / math.sqrt(2)), 1e-30, 1e-5)
    call(lib, "act", 2, t, out, t.size)
    u = math.sqrt(2 / math.pi) * (t64 + 0.044715 * t64 ** 3)
    check(f"[{isa}] gelu(tanh)", out, 0.5 * t64 * (1 + np.tanh(u)), 1e-12, 1e-5)
    gu = rng.normal(0, 3, (3, 2 * 100)).astype(F32)
    o = np.zeros((3, 100), F32)
    call(lib, "swiglu", gu, o, 3, 100)
    g, up = gu[:, :100].astype(np.float64), gu[:, 100:].astype(np.float64)
    check(f"[{isa}] swiglu", o, g / (1 + np.exp(-g)) * up, 1e-30, 3e-6)


def powf32(base, exps):
    """float32 pow as torch computes it on CPU (it matches glibc powf exactly for the RoPE exponents,
    checked against torch 2.13; numpy's SVML float32 power differs by 1 ulp for some of them)."""
    try:
        libm = ctypes.CDLL("libm.so.6")
        libm.powf.restype = ctypes.c_float
        libm.powf.argtypes = [ctypes.c_float, ctypes.c_float]
        return np.array([libm.powf(float(base), float(e)) for e in exps], F32)
    except OSError:
        return (F32(base) ** exps).astype(F32)


def rope_hf(x, pos, theta, rot_dim):
    """transformers' Llama RoPE: inv_freq = 1/(theta ** (arange(0, d, 2)/d)) in float32, freqs = pos*inv_freq,
    emb = cat(freqs, freqs), x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x2, x1)."""
    inv_freq = (F32(1.0) / powf32(theta, np.arange(0, rot_dim, 2, dtype=np.int64).astype(F32) / F32(rot_dim))).astype(F32)
    freqs = (pos.astype(F32)[:, None] * inv_freq[None, :]).astype(F32)
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    cos, sin = np.cos(emb), np.sin(emb)
    xr = x[..., :rot_dim].astype(np.float64)
    x1, x2 = xr[..., : rot_dim // 2], xr[..., rot_dim // 2:]
    rot = np.concatenate([-x2, x1], axis=-1)
    out = x.astype(np.float64).copy()
    out[..., :rot_dim] = xr * cos[:, None, :] + rot * sin[:, None, :]
    return out


def check_rope(lib, rng, isa):
    # Angles are fp32 products pos * inv_freq as in HF; with the same inv_freq they are bit-identical,
    # so even far positions get a tight tolerance.
    rows, H, D = 6, 4, 128
    for pos, atol in ((np.array([0, 1, 2, 17, 100, 1023], np.int32), 2e-5),
                      (np.array([2047, 4000, 8191, 8000, 5555, 3000], np.int32), 2e-5)):
        for rot in (D, D // 2):
            x = rng.normal(0, 1, (rows, H, D)).astype(F32)
            y = x.copy()
            call(lib, "rope", y, rows, H, D, rot, pos, 10000.0, 8192)
            check(f"[{isa}] rope rot={rot} pos<={pos.max()}", y, rope_hf(x, pos, 10000.0, rot), atol, 2e-5)


def check_attention(lib, rng, isa):
    for (n_q, q_pos0, H, Hkv, D, causal) in [(1, 63, 8, 2, 64, 1), (24, 40, 4, 4, 128, 1), (20, 0, 6, 2, 80, 1),
                                             (33, 0, 2, 2, 64, 0)]:
        n_kv = q_pos0 + n_q
        q = rng.normal(0, 1, (n_q, H, D)).astype(F32)
        k = rng.normal(0, 1, (Hkv, n_kv, D)).astype(F32)
        v = rng.normal(0, 1, (Hkv, n_kv, D)).astype(F32)
        out = np.zeros((n_q, H, D), F32)
        scale = 1 / math.sqrt(D)
        call(lib, "attention", q, k, v, out, n_q, n_kv, q_pos0, H, Hkv, D, causal, scale)
        rep = H // Hkv
        kk = np.repeat(k, rep, axis=0).astype(np.float64)  # [H, n_kv, D]
        vv = np.repeat(v, rep, axis=0).astype(np.float64)
        s = np.einsum("qhd,htd->hqt", q.astype(np.float64), kk) * scale
        if causal:
            mask = np.arange(n_kv)[None, :] > (q_pos0 + np.arange(n_q))[:, None]
            s = np.where(mask[None], -np.inf, s)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want = np.einsum("hqt,htd->qhd", p, vv)
        check(f"[{isa}] attention n_q={n_q} H={H}/{Hkv} D={D} causal={causal}", out, want, 2e-5, 1e-4)


def main():
    lib = load(sys.argv[1])
    isas = [lib.etest_isa_at(i) for i in range(lib.etest_num_isas())]
    for isa in isas:
        name = lib.etest_isa_name(isa).decode()
        if lib.etest_set_isa(isa) != 0:
            FAILS.append(f"cannot select ISA {name}")
            continue
        rng = np.random.default_rng(0)
        check_w8a8(lib, rng, name)
        check_woq(lib, rng, name)
        check_f32(lib, rng, name)
        check_elementwise(lib, rng, name)
        check_rope(lib, rng, name)
        check_attention(lib, rng, name)
        print(f"{name}: done")
    if FAILS:
        print("\n".join(FAILS))
        print(f"{len(FAILS)} failure(s)")
        sys.exit(1)
    print("numpy cross-check: all ok")


if __name__ == "__main__":
    main()
