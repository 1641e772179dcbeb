"""Packed linear layers that compute with their packed tensors (docs/formats.md).

- `QuantLinear`: weight-only int8 / int4 (group-wise, symmetric or asymmetric); dequantizes the packed
  weight on the fly and runs a float matmul.
- `W8A8Linear`: int8 weights per output channel and one static int8 scale for the input tensor; the
  int8 x int8 product runs as an exact integer matmul, and the shadow path adds back in float what
  the activation clipping removed (after mllm-NPU).
Both keep the float bias, expose `in_features`/`out_features`, and describe themselves with
`metadata()` (what `config.extras["quantization"]["layers"][name]` records).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgemmError
from . import qformat
from .common import NM_ATTR


class PackedLinear(nn.Module):
    in_features: int
    out_features: int
    method: str

    def metadata(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _copy_from(self, linear: nn.Module) -> None:
        if getattr(linear, "bias", None) is not None:
            self.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        if getattr(linear, NM_ATTR, None) is not None:
            setattr(self, NM_ATTR, dict(getattr(linear, NM_ATTR)))


class QuantLinear(PackedLinear):
    """y = x @ W^T + b with W stored as int8 [N, K] or packed int4 [N, K/2] plus float16 scales
    [N, K/G] (and zero points when asymmetric)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool, method: str = "rtn"):
        super().__init__()
        qformat.check_bits(bits)
        if in_features % group_size:
            raise EdgemmError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.method = bits, group_size, symmetric, method
        g = in_features // group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=torch.float16))
        if not symmetric:
            self.register_buffer("zeros", torch.zeros(out_features, g, dtype=torch.int8 if bits == 8 else torch.uint8))
        else:
            self.zeros = None
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, linear: nn.Module, u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   symmetric: bool, method: str) -> "QuantLinear":
        n, k = u.shape
        q = cls(k, n, bits, k // scale.shape[1], symmetric, getattr(linear, "bias", None) is not None, method)
        for name, t in qformat.to_storage(u, scale, zero, bits, symmetric).items():
            getattr(q, name).copy_(t)
        q._copy_from(linear)
        return q

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    def dequantized_weight(self) -> torch.Tensor:
        return qformat.dequantize_storage(self.qweight, self.scales, self.zeros, self.bits)

    def codes(self):
        """(u, scale, zero) in the unsigned domain (see qformat)."""
        return qformat.from_storage(self.qweight, self.scales, self.zeros, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def metadata(self) -> dict:
        return {"format": self.format, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "method": self.method, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.format}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, method={self.method}")


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 result of int8 a [M, K] @ int8 b_t [N, K]^T."""
    if a.shape[0] == 0:
        return torch.zeros(0, b_t.shape[0], dtype=torch.int32)
    try:
        return torch._int_mm(a.contiguous(), b_t.t().contiguous())
    except (RuntimeError, AttributeError):  # shapes the int8 kernel does not take: exact in float64
        return (a.double() @ b_t.double().t()).to(torch.int32)


class W8A8Linear(PackedLinear):
    """int8 weights per output channel x int8 activations with one static per-tensor scale.

    Activation codes are clamp(round(x / input_scale), -128, 127); the int8 GEMM is exact (int32).
    With `shadow`, every element whose code would clip is split: its clipped code goes through the
    int8 GEMM and the remainder x - code * input_scale is multiplied in float with the matching
    (dequantized) weight column and added back, so nothing clips silently. `outlier_channels` lists
    the input channels where calibration saw clipping (what a runtime keeps ready in float)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, n_outliers: int = 0, shadow: bool = True,
                 method: str = "w8a8"):
        super().__init__()
        self.in_features, self.out_features, self.shadow, self.method = in_features, out_features, shadow, method
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("outlier_channels", torch.zeros(n_outliers, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.calibration: dict = {}  # what calibration saw (kept in the metadata)
        self.last_shadow_elements = 0  # elements that took the shadow path in the last call

    @property
    def format(self) -> str:
        return "w8a8"

    @classmethod
    def from_linear(cls, linear: nn.Module, weight: torch.Tensor, input_scale: float, outlier_channels: torch.Tensor,
                    shadow: bool, calibration: dict | None = None) -> "W8A8Linear":
        n, k = weight.shape
        m = cls(k, n, getattr(linear, "bias", None) is not None, len(outlier_channels), shadow)
        u, scale, _ = qformat.rtn(weight.float(), 8, k, True)  # per output channel, codes in [-127, 127]
        m.qweight.copy_((u - 128).to(torch.int8))
        m.weight_scale.copy_(scale[:, 0].float())
        m.input_scale.fill_(float(input_scale))
        m.outlier_channels.copy_(outlier_channels.to(torch.int32))
        m.calibration = dict(calibration or {})
        m._copy_from(linear)
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).float()
        s = self.input_scale
        r = torch.round(xf / s)
        code = r.clamp(-128, 127)
        acc = int8_matmul(code.to(torch.int8), self.qweight)
        y = acc.float() * (s * self.weight_scale)
        self.last_shadow_elements = 0
        if self.shadow:
            clipped = r != code
            if bool(clipped.any()):
                self.last_shadow_elements = int(clipped.sum())
                cols = clipped.any(0).nonzero()[:, 0]
                rem = torch.where(clipped[:, cols], xf[:, cols] - code[:, cols] * s, torch.zeros((), dtype=xf.dtype))
                wcols = self.qweight[:, cols].float() * self.weight_scale[:, None]
                y = y + rem @ wcols.t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def metadata(self) -> dict:
        return {"format": "w8a8", "bits": 8, "method": self.method, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None, "shadow": self.shadow,
                "outlier_channels": int(self.outlier_channels.numel()), "input_scale": float(self.input_scale),
                **{k: v for k, v in self.calibration.items() if k not in ("outlier_channels",)}}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w8a8, "
                f"input_scale={float(self.input_scale):.4g}, outliers={self.outlier_channels.numel()}, shadow={self.shadow}")


def restore_layer(meta: dict, name: str) -> PackedLinear:
    """An empty packed layer with the shapes recorded in `meta` (its tensors come from the checkpoint)."""
    try:
        fmt = meta["format"]
        k, n, bias = int(meta["in_features"]), int(meta["out_features"]), bool(meta["bias"])
        if fmt in ("int8", "int4"):
            m = QuantLinear(k, n, int(meta["bits"]), int(meta["group_size"]), bool(meta["symmetric"]), bias,
                            str(meta.get("method", "rtn")))
        elif fmt == "w8a8":
            m = W8A8Linear(k, n, bias, int(meta["outlier_channels"]), bool(meta.get("shadow", True)),
                           str(meta.get("method", "w8a8")))
            m.calibration = {kk: v for kk, v in meta.items()
                             if kk not in ("format", "bits", "method", "in_features", "out_features", "bias", "shadow",
                                           "outlier_channels", "input_scale")}
        else:
            raise EdgemmError(f"layer {name}: unknown quantized format {fmt!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise EdgemmError(f"config.extras.quantization: layer {name} has bad metadata ({type(e).__name__}: {e})") from None
    except EdgemmError as e:
        raise EdgemmError(f"config.extras.quantization: layer {name}: {e}") from None
    return m
