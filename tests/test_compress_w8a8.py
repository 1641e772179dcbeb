"""W8A8 with shadow outliers (edgemm.compress.w8a8) against float64 references."""

import pytest
import torch
from torch import nn

from edgemm.compress import apply, config_from_dict
from edgemm.compress.modules import W8A8Linear, int8_matmul
from test_compress_quant import one_thread  # noqa: F401


def make_layer(k=96, n=40, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.normal_(0, 0.1)
        lin.bias.normal_(0, 0.1)
    return lin


def clean_inputs(t=512, k=96, seed=0):
    """Bounded activations (uniform in [-2, 2]): no tail, so only injected outliers exceed the clipped range."""
    return torch.rand(t, k, generator=torch.Generator().manual_seed(seed)) * 4 - 2


def with_outliers(x, channels=(3, 17, 60), value=60.0, every=50):
    x = x.clone()
    for c in channels:
        x[::every, c] = value * torch.sign(x[::every, c] + 1e-3)
    return x


def reference(mod: W8A8Linear, x, clip: bool):
    """float64: x on the int8 grid, round(x / s) * s, times the dequantized weights; values beyond the
    int8 range are clamped (`clip`) or kept exactly as they are (what the shadow path promises)."""
    s = float(mod.input_scale)
    codes = torch.round(x.double() / s)
    if clip:
        codes = codes.clamp(-128, 127)
    else:
        codes = torch.where((codes < -128) | (codes > 127), x.double() / s, codes)
    w = mod.qweight.double() * mod.weight_scale.double()[:, None]
    return codes * s @ w.T + mod.bias.double()


def calibrate(x, **cfg):
    m = nn.Sequential(make_layer())
    apply(m, config_from_dict({"method": "w8a8", "exclude": [], **cfg}), forward_loop=lambda mod: mod(x))
    return m


def test_int8_matmul_is_exact():
    g = torch.Generator().manual_seed(0)
    for mm, k, n in [(5, 96, 40), (1, 7, 3), (64, 768, 704)]:
        a = torch.randint(-128, 128, (mm, k), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        assert torch.equal(int8_matmul(a, b).long(), (a.long() @ b.long().T))


def test_w8a8_matches_the_integer_reference_without_outliers():
    x = clean_inputs()
    m = calibrate(x)
    q = m[0]
    assert isinstance(q, W8A8Linear) and q.qweight.dtype == torch.int8 and int(q.qweight.abs().max()) <= 127
    assert q.weight_scale.shape == (40,) and q.input_scale.shape == () and q.outlier_channels.numel() == 0
    with torch.no_grad():
        y = m(x).double()
        ref = make_layer()(x).double()
    assert torch.allclose(y, reference(q, x, clip=True), rtol=1e-5, atol=1e-5)
    assert float((y - ref).pow(2).mean() / ref.pow(2).mean()) < 2e-4  # and close to the float layer


def test_shadow_path_makes_w8a8_exact_up_to_rounding_where_plain_w8a8_clips():
    calib = with_outliers(clean_inputs(seed=1))
    x = with_outliers(clean_inputs(seed=2), value=80.0)  # beyond even the calibration max
    shadow = calibrate(calib, shadow=True)
    plain = calibrate(calib, shadow=False, scale="clipped")  # same scale, no shadow path
    qs, qp = shadow[0], plain[0]
    assert float(qs.input_scale) == float(qp.input_scale)
    assert qs.calibration["scale_choice"] == "clipped"
    assert sorted(qs.outlier_channels.tolist()) == [3, 17, 60]
    with torch.no_grad():
        ys, yp = shadow(x).double(), plain(x).double()
        fl = make_layer()(x).double()
    exact = reference(qs, x, clip=False)  # nothing clips: only the rounding of in-range values remains
    assert qs.last_shadow_elements == 3 * len(range(0, 512, 50))
    assert torch.allclose(ys, exact, rtol=1e-5, atol=1e-4)
    assert torch.allclose(yp, reference(qp, x, clip=True), rtol=1e-5, atol=1e-4)
    err_s = float((ys - fl).pow(2).mean() / fl.pow(2).mean())
    err_p = float((yp - fl).pow(2).mean() / fl.pow(2).mean())
    assert err_s < 1e-3 and err_p > 100 * err_s, (err_s, err_p)


def test_scale_choice_follows_the_outlier_threshold():
    clean = calibrate(clean_inputs())[0]
    assert clean.calibration["scale_choice"] == "maxabs"  # no heavy tail: max-abs
    spiky = calibrate(with_outliers(clean_inputs()))[0]
    assert spiky.calibration["scale_choice"] == "clipped" and spiky.calibration["clip_ratio"] >= 4
    # without the shadow path the default keeps the max-abs range (nothing clips on calibration data)
    noshadow = calibrate(with_outliers(clean_inputs()), shadow=False)[0]
    assert noshadow.calibration["scale_choice"] == "maxabs" and noshadow.outlier_channels.numel() == 0
    md = spiky.metadata()
    assert md["format"] == "w8a8" and md["outlier_channels"] == 3 and md["shadow"] is True


def test_smoothquant_migration_is_folded_exactly():
    from test_compress_quant import NormBlock, correlated_inputs

    x = correlated_inputs(k=64)
    ref = NormBlock()
    m = NormBlock()
    rep = apply(m, config_from_dict({"method": "w8a8", "smoothquant": 0.5, "exclude": []}), forward_loop=lambda mod: mod(x))
    assert rep["smoothed"] == ["layer_norm2"]
    with torch.no_grad():
        y, yr = m(x), ref(x)
    assert float((y - yr).pow(2).mean() / yr.pow(2).mean()) < 1e-3
