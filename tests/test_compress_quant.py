"""Weight-only quantization (edgemm.compress: RTN, GPTQ, AWQ) against plain references on small layers."""

import numpy as np
import pytest
import torch
from torch import nn

from edgemm.compress import apply, config_from_dict
from edgemm.compress import qformat
from edgemm.compress.gptq import gptq_weight
from edgemm.compress.modules import QuantLinear
from edgemm.errors import EdgemmError


@pytest.fixture(autouse=True)
def one_thread():
    """These layers are tiny: one thread avoids OpenMP barrier costs (large on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def correlated_inputs(t=2048, k=64, seed=0, draw=0, spread=True):
    """Correlated activations with channels of very different magnitudes (as real activations have).
    `seed` fixes the distribution (mixing and channel scales), `draw` the samples."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scales = torch.exp(torch.randn(k, generator=g)) if spread else torch.ones(k)
    z = torch.randn(t, k, generator=torch.Generator().manual_seed(1000 + draw))
    return (z @ mix) * scales


def layer(k=64, n=48, seed=1, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.1)
    return lin


def loop_over(x, bs=256):
    def forward_loop(model):
        for i in range(0, x.shape[0], bs):
            model(x[i:i + bs])
    return forward_loop


def out_err(model, ref_lin, x):
    with torch.no_grad():
        return float((model(x) - ref_lin(x)).pow(2).mean() / ref_lin(x).pow(2).mean())


# ------------------------------------------------------------------------------------ formats / packing


def test_int4_packing_round_trips_bit_exactly_and_follows_the_nibble_layout():
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (7, 40), generator=g, dtype=torch.int16)
    p = qformat.pack_int4(u)
    assert p.dtype == torch.uint8 and p.shape == (7, 20)
    assert torch.equal(qformat.unpack_int4(p), u)
    # formats.md: input k in byte k // 2, low nibble when k is even
    assert int(p[3, 5]) == int(u[3, 10]) | (int(u[3, 11]) << 4)
    with pytest.raises(EdgemmError, match="0..15"):
        qformat.pack_int4(torch.full((1, 2), 16, dtype=torch.int16))


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_storage_round_trip_and_the_formats_md_value_formula(bits, symmetric):
    w = torch.randn(12, 64) * 0.3
    w[0, :32] = 0  # an all-zero group
    u, scale, zero = qformat.rtn(w, bits, 32, symmetric)
    st = qformat.to_storage(u, scale, zero, bits, symmetric)
    assert st["scales"].dtype == torch.float16 and st["scales"].shape == (12, 2)
    assert ("zeros" in st) == (not symmetric)
    u2, s2, z2 = qformat.from_storage(st["qweight"], st["scales"], st.get("zeros"), bits)
    assert torch.equal(u2, u) and torch.equal(s2, scale) and torch.equal(z2, zero)
    # an independent numpy reading of docs/formats.md
    q = st["qweight"].numpy()
    sc = np.repeat(st["scales"].numpy().astype(np.float32), 32, axis=1)
    if bits == 8:
        codes = q.astype(np.float32)
        zp = np.repeat(st["zeros"].numpy().astype(np.float32), 32, 1) if not symmetric else 0.0
        if symmetric:
            assert codes.min() >= -127 and codes.max() <= 127
    else:
        codes = np.empty((12, 64), np.float32)
        codes[:, 0::2], codes[:, 1::2] = q & 0xF, q >> 4
        zp = np.repeat(st["zeros"].numpy().astype(np.float32), 32, 1) if not symmetric else 8.0
    ref = (codes - zp) * sc
    assert np.array_equal(ref, qformat.dequantize_storage(st["qweight"], st["scales"], st.get("zeros"), bits).numpy())
    assert np.all(ref[0, :32] == 0)


def naive_rtn(w, bits, group, symmetric):
    """Element by element, straight from the definitions."""
    w = w.double().numpy()
    out = np.zeros_like(w)
    qmax = 2**bits - 1
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            x = w[r, g0:g0 + group]
            if symmetric:
                s = float(np.float16(np.abs(x).max() / (127 if bits == 8 else 7.5))) or 1.0
                lo, hi = (-127, 127) if bits == 8 else (-8, 7)
                out[r, g0:g0 + group] = np.clip(np.round(x / s), lo, hi) * s
            else:
                mn, mx = min(x.min(), 0), max(x.max(), 0)
                s = float(np.float16((mx - mn) / qmax)) or 1.0
                z = np.clip(np.round(-mn / s), 0, qmax)
                out[r, g0:g0 + group] = (np.clip(np.round(x / s) + z, 0, qmax) - z) * s
    return out


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 16, False), (8, 64, True), (8, 32, False)])
def test_rtn_matches_a_naive_reference(bits, group, symmetric):
    w = torch.randn(10, 64) * 0.2
    u, s, z = qformat.rtn(w, bits, group, symmetric)
    got = qformat.dequantize(u, s, z).double().numpy()
    ref = naive_rtn(w, bits, group, symmetric)
    assert np.abs(got - ref).max() < 1e-6


def test_quant_linear_computes_with_its_packed_tensors():
    lin = layer()
    m = nn.Sequential(lin)
    x = torch.randn(5, 64)
    apply(m, config_from_dict({"method": "rtn", "bits": 4, "group_size": 16, "exclude": []}))
    q = m[0]
    assert isinstance(q, QuantLinear) and q.qweight.dtype == torch.uint8 and q.qweight.shape == (48, 32)
    w = qformat.dequantize_storage(q.qweight, q.scales, q.zeros, 4)
    assert torch.allclose(m(x), x @ w.T + q.bias, atol=1e-6)
    # int8 per output channel: one scale per row
    m8 = nn.Sequential(layer())
    apply(m8, config_from_dict({"method": "rtn", "bits": 8, "group_size": 0, "exclude": []}))
    assert m8[0].qweight.dtype == torch.int8 and m8[0].scales.shape == (48, 1)


# -------------------------------------------------------------------------------------------- GPTQ / AWQ


def naive_gptq_per_channel(W, H, bits, symmetric, damp):
    """The OBS view of GPTQ, no tricks: quantize column i, spread its error with the inverse Hessian of
    the remaining columns, remove column i from that inverse; float64 throughout."""
    W = W.double().clone()
    H = H.double().clone()
    k = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    scale, zero = qformat.qparams(W.float(), bits, k, symmetric)
    s, z = scale[:, 0].double(), zero[:, 0].double()
    lo, hi = (1, 255) if (bits == 8 and symmetric) else (0, 2**bits - 1)
    Q = torch.zeros_like(W)
    for i in range(k):
        q = (torch.clamp(torch.round(W[:, i] / s) + z, lo, hi) - z) * s
        Q[:, i] = q
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return Q


def test_gptq_matches_the_naive_obs_reference_and_lazy_blocks_change_nothing():
    x = correlated_inputs(t=1024, k=48)
    lin = layer(k=48, n=16)
    H = 2 * x.T @ x / x.shape[0]
    ref = naive_gptq_per_channel(lin.weight.detach(), H, 4, True, 0.01)
    for bs in (128, 5):
        u, s, z = gptq_weight(lin.weight, H, 4, 48, True, damp=0.01, act_order=False, block_size=bs)
        got = qformat.dequantize(u, s, z).double()
        # same grid; a code can differ only where float32 vs float64 rounding hits a tie
        assert (got - ref).abs().gt(1e-5).float().mean() < 0.01


class NormBlock(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2, named like a ViT block (so AWQ finds the foldable norm)."""

    def __init__(self, k=64, hidden=96, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.layer_norm2 = nn.LayerNorm(k)
        with torch.no_grad():
            self.layer_norm2.weight.copy_(torch.exp(torch.randn(k)))  # uneven channel magnitudes
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        self.mlp.fc1 = layer(k, hidden, seed)
        self.mlp.fc2 = layer(hidden, k, seed + 1)

    def forward(self, x):
        return self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.layer_norm2(x))))


@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, True), (4, 32, False), (8, 0, True)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group, symmetric):
    x = correlated_inputs()
    ref = layer()
    errs = {}
    for mth in ("rtn", "gptq"):
        m = nn.Sequential(layer())
        apply(m, config_from_dict({"method": mth, "bits": bits, "group_size": group, "symmetric": symmetric, "exclude": []}),
              forward_loop=loop_over(x))
        errs[mth] = out_err(m, ref, correlated_inputs(draw=5))  # fresh inputs of the same distribution
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


@pytest.mark.parametrize("bits,group,symmetric,gain", [(4, 16, True, 0.9), (4, 32, False, 0.9), (8, 0, True, 1.0)])
def test_awq_beats_rtn_on_correlated_inputs(bits, group, symmetric, gain):
    x = correlated_inputs()
    ref = NormBlock()
    errs = {}
    for mth in ("rtn", "awq"):
        m = NormBlock()
        rep = apply(m, config_from_dict({"method": mth, "bits": bits, "group_size": group, "symmetric": symmetric,
                                         "exclude": []}), forward_loop=loop_over(x))
        if mth == "awq":
            assert [g["prev"] for g in rep["scaled_groups"]] == ["layer_norm2"]
        errs[mth] = out_err(m, ref, correlated_inputs(draw=5))
    assert errs["awq"] < gain * errs["rtn"], errs


def test_gptq_act_order_keeps_consecutive_groups():
    x = correlated_inputs()
    m = nn.Sequential(layer())
    rep = apply(m, config_from_dict({"method": "gptq", "bits": 4, "group_size": 16, "act_order": True, "exclude": []}),
                forward_loop=loop_over(x))
    assert rep["layers_touched"] == 1 and rep["uncalibrated"] == []
    q = m[0]
    assert q.scales.shape == (48, 4) and q.group_size == 16
    # every code re-quantizes to itself under its group's scale: the format is plain group-wise
    u, s, z = q.codes()
    w = qformat.dequantize(u, s, z)
    assert torch.equal(qformat.quantize(w, s, z, 4, True), u)


def test_awq_folds_scales_into_the_preceding_norm_without_changing_the_float_function():
    from edgemm.compress.awq import search_scale
    from edgemm.compress.smoothing import fold, scale_groups

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer_norm2 = nn.LayerNorm(64)
            self.mlp = nn.Module()
            self.mlp.fc1 = layer(64, 96)
            self.mlp.fc2 = layer(96, 64, seed=3)
            self.self_attn = nn.Module()

        def forward(self, x):
            return self.mlp.fc2(torch.relu(self.mlp.fc1(self.layer_norm2(x))))

    b = Block()
    with torch.no_grad():
        b.layer_norm2.weight.uniform_(0.5, 2.0)
        b.layer_norm2.bias.normal_(0, 0.1)
    groups = scale_groups(b, ["mlp.fc1", "mlp.fc2"])
    assert [(g.prev, g.linears) for g in groups] == [("layer_norm2", ["mlp.fc1"])]  # fc2 follows an activation
    x = correlated_inputs(k=64)
    y0 = b(x)
    h = b.layer_norm2(x).detach()
    s, errs = search_scale([b.mlp.fc1.weight.detach()], h.T @ h, h.abs().mean(0), 4, 16, True)
    assert min(errs.values()) <= errs[0.0]
    fold(b, groups[0], s)
    assert torch.allclose(b(x), y0, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("d,msg", [
    ({"method": "rtn", "bits": 3}, "bits 3 is not supported"),
    ({"method": "gptq", "bits": 4, "group_size": -5}, "group_size"),
    ({"method": "awq", "bits": 16}, "bits 16"),
    ({"method": "magnitude", "pattern": "4:4"}, "need 0 < N < M"),
    ({"method": "wanda", "pattern": "5:4"}, "need 0 < N < M"),
    ({"method": "sparsegpt", "pattern": 124}, "quote it"),
    ({"method": "maskllm", "pattern": "2-4"}, "expected N:M"),
    ({"method": "nope"}, "unknown compression method 'nope'"),
    ({"bits": 4}, "needs a 'method'"),
    ({"method": "gptq", "bitz": 4}, "unknown option 'bitz'"),
    ({"method": "w8a8", "clip_percentile": 10}, "clip_percentile"),
    ({"method": "maskllm", "prior": "oracle"}, "prior"),
])
def test_bad_configs_give_clear_errors(d, msg):
    with pytest.raises(EdgemmError, match=msg):
        config_from_dict(d)


def test_group_size_not_dividing_in_features_names_the_layer():
    m = nn.Sequential(layer(k=48))
    with pytest.raises(EdgemmError, match=r"group size 32 does not divide in_features 48 of 0"):
        apply(m, config_from_dict({"method": "rtn", "bits": 4, "group_size": 32, "exclude": []}))
    assert isinstance(m[0], nn.Linear)  # nothing was touched


def test_calibrated_methods_need_a_forward_loop_and_selection_must_match():
    with pytest.raises(EdgemmError, match="forward_loop"):
        apply(nn.Sequential(layer()), config_from_dict({"method": "gptq", "exclude": []}))
    with pytest.raises(EdgemmError, match="no layer matches"):
        apply(nn.Sequential(layer()), config_from_dict({"method": "rtn", "include": ["vision.*"]}))


def test_config_dicts_round_trip():
    for d in ({"method": "gptq", "bits": 4, "group_size": 32}, {"method": "maskllm", "pattern": "2:4"},
              {"method": "w8a8", "shadow": True}, {"method": "awq", "bits": 8, "group_size": "channel"}):
        c = config_from_dict(d)
        assert config_from_dict(c.to_dict()) == c
