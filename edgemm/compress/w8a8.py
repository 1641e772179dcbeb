"""W8A8 for the prefill "NPU lane" with shadow outliers (after mllm-NPU).

Weights: int8 per output channel (symmetric, codes in [-127, 127]). Activations: one static int8 scale
per input tensor from calibration. Per layer, calibration measures the max-abs range and a clipped
range (the top 0.1% of |x| removed by default); where max-abs >= `outlier_threshold` x clipped the
clipped scale is used (finer steps for the bulk of the values) and the input channels that would clip
are recorded as outlier channels. At run time the shadow path computes every clipped remainder in
float against the matching weight columns and adds it back (modules.W8A8Linear), so nothing clips
silently. Optional SmoothQuant migration (s_j = max|X_j|^a / max|W_j|^(1-a)) is folded into the
preceding norm / linear first, where the graph allows it.
"""

from __future__ import annotations

import time
import zlib

import torch
from torch import nn

from ..progress import progress
from .common import LayerStats, collect_stats, need_forward_loop, select_layers, set_module, sync_extras
from .config import W8A8Config
from .modules import W8A8Linear
from .smoothing import fold, scale_groups

__all__ = ["W8A8Config", "w8a8_quantize", "activation_scale"]


def activation_scale(st: LayerStats, config: W8A8Config) -> tuple[float, torch.Tensor, dict]:
    """-> (input_scale, outlier channels, calibration record) for one layer's statistics."""
    amax = float(st.absmax.max())
    sample = torch.cat(st.samples).abs() if st.samples else torch.zeros(1)
    kth = min(sample.numel(), max(1, int(round(sample.numel() * config.clip_percentile / 100.0))))
    clipped = float(sample.float().kthvalue(kth).values)
    clipped = min(max(clipped, 1e-8), max(amax, 1e-8))
    ratio = amax / clipped if clipped > 0 else 1.0
    if config.scale == "maxabs":
        use_clipped = False
    elif config.scale == "clipped":
        use_clipped = True
    else:
        use_clipped = config.shadow and ratio >= config.outlier_threshold
    rng = clipped if use_clipped else amax
    scale = max(rng, 1e-8) / 127.0
    scale = float(torch.tensor(scale, dtype=torch.float32))
    # channels whose calibration values would clip: round(x / s) outside [-128, 127]
    hi = torch.round(st.max / scale) > 127
    lo = torch.round(st.min / scale) < -128
    outliers = (hi | lo).nonzero()[:, 0].to(torch.int32)
    rec = {"scale_choice": "clipped" if use_clipped else "maxabs", "calib_absmax": round(amax, 6),
           "calib_clipped": round(clipped, 6), "clip_ratio": round(ratio, 3)}
    return scale, outliers, rec


@torch.no_grad()
def w8a8_quantize(model: nn.Module, config: W8A8Config, forward_loop=None, quiet: bool = True) -> dict:
    """Replace the selected nn.Linear layers by W8A8Linear, calibrated with `forward_loop(model)`."""
    config.validate()
    need_forward_loop(forward_loop, "w8a8")
    t0 = time.perf_counter()
    layers = select_layers(model, config.include, config.exclude)
    smoothed = []
    if config.smoothquant is not None:
        sgroups = scale_groups(model, layers)
        st = collect_stats(model, {n: layers[n] for g in sgroups for n in g.linears[:1]}, forward_loop,
                           lambda n, m: LayerStats(m.in_features))
        a = config.smoothquant
        for g in sgroups:
            s0 = st.get(g.linears[0])
            if s0 is None or s0.n == 0:
                continue
            wmax = torch.stack([layers[n].weight.detach().abs().amax(0) for n in g.linears]).amax(0).float()
            s = (s0.absmax.float().clamp(min=1e-5).pow(a) / wmax.clamp(min=1e-5).pow(1 - a)).clamp(min=1e-5)
            fold(model, g, s)
            smoothed.append(g.prev)
    stats = collect_stats(model, layers, forward_loop,
                          lambda n, m: LayerStats(m.in_features, samples=config.samples_per_batch, seed=zlib.crc32(n.encode())))
    missing, summary = [], {}
    with progress(len(layers), "w8a8", quiet=quiet) as bar:
        for name, layer in layers.items():
            st = stats.get(name)
            if st is None or st.n == 0:
                missing.append(name)
                # never reached by calibration: a conservative scale from the weights' input range is
                # meaningless, so use 1/127 (|x| <= 1 without clipping) and rely on the shadow path.
                scale, outliers, rec = 1.0 / 127.0, torch.zeros(0, dtype=torch.int32), {"scale_choice": "uncalibrated"}
            else:
                scale, outliers, rec = activation_scale(st, config)
            set_module(model, name, W8A8Linear.from_linear(layer, layer.weight.detach(), scale, outliers, config.shadow, rec))
            summary[name] = {"outlier_channels": int(outliers.numel()), **rec}
            bar.advance(1, info=name)
    sync_extras(model)
    return {"method": "w8a8", "shadow": config.shadow, "layers": list(layers), "uncalibrated": missing,
            "smoothed": smoothed, "outliers": {n: v["outlier_channels"] for n, v in summary.items() if v["outlier_channels"]},
            "clipped_layers": [n for n, v in summary.items() if v.get("scale_choice") == "clipped"],
            "wall_s": round(time.perf_counter() - t0, 2)}
