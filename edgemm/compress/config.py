"""The dataclass configs of every weight method, and `config_from_dict` (the YAML recipe form).

Torch-free, so recipes and the CLI can validate a configuration before loading a model. Each method
module (rtn, gptq, awq, w8a8, magnitude, wanda, sparsegpt, maskllm) re-exports its config next to its
entry function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import EdgemmError

DEFAULT_INCLUDE = ["*"]
# The LM head stays in float by default: its error lands directly on the logits, it is tied to the
# embeddings in many models, and every reference implementation of GPTQ/AWQ/SparseGPT/Wanda skips it.
DEFAULT_EXCLUDE = ["*lm_head"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise EdgemmError(msg)


@dataclass
class _Base:
    method: ClassVar[str] = "?"
    kind: ClassVar[str] = "?"  # "quantize" or "sparsify"
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))

    def validate(self):
        for what in ("include", "exclude"):
            v = getattr(self, what)
            if isinstance(v, str):
                v = [v]
                setattr(self, what, v)
            _check(isinstance(v, (list, tuple)) and all(isinstance(p, str) and p for p in v),
                   f"{self.method}: {what} must be a list of module-name patterns")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


@dataclass
class _WeightQuant(_Base):
    kind: ClassVar[str] = "quantize"
    bits: int = 4
    group_size: int = 32  # 0 = per output channel (G = in_features)
    symmetric: bool = True

    def validate(self):
        super().validate()
        _check(self.bits in (4, 8) and not isinstance(self.bits, bool),
               f"{self.method}: bits {self.bits!r} is not supported: choose 4 or 8")
        _check(isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size >= 0,
               f"{self.method}: group_size must be a positive integer (or 0 for per-channel), got {self.group_size!r}")
        _check(isinstance(self.symmetric, bool), f"{self.method}: symmetric must be true or false")
        return self


@dataclass
class RTNConfig(_WeightQuant):
    """Round-to-nearest weight-only quantization (no calibration)."""

    method: ClassVar[str] = "rtn"


@dataclass
class GPTQConfig(_WeightQuant):
    """GPTQ: Hessian H = 2/n X^T X from calibration, damping, act-order, lazy block updates."""

    method: ClassVar[str] = "gptq"
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    act_order: bool = True  # quantize columns by decreasing diag(H) (groups stay the original consecutive inputs)
    block_size: int = 128  # lazy batch of columns whose updates are applied together
    sequential: bool = True  # calibrate block by block on the already-quantized model

    def validate(self):
        super().validate()
        _check(0 <= self.damp < 1, f"gptq: damp must be in [0, 1), got {self.damp}")
        _check(isinstance(self.block_size, int) and self.block_size >= 1, "gptq: block_size must be >= 1")
        return self


@dataclass
class AWQConfig(_WeightQuant):
    """AWQ: per-input-channel scales s = mean|x|^alpha searched on the output error and folded into the
    preceding norm / linear where the graph allows it; then a per-group clip search."""

    method: ClassVar[str] = "awq"
    n_grid: int = 20  # alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    scale_search: bool = True
    clip_search: bool = True
    max_shrink: float = 0.5  # clip ratios from 1 down to 1 - max_shrink
    clip_grid: int = 20
    sequential: bool = True

    def validate(self):
        super().validate()
        _check(isinstance(self.n_grid, int) and self.n_grid >= 1, "awq: n_grid must be >= 1")
        _check(isinstance(self.clip_grid, int) and self.clip_grid >= 1, "awq: clip_grid must be >= 1")
        _check(0 <= self.max_shrink < 1, "awq: max_shrink must be in [0, 1)")
        return self


@dataclass
class W8A8Config(_Base):
    """int8 weights per output channel, one static int8 scale per activation tensor, shadow outliers."""

    method: ClassVar[str] = "w8a8"
    kind: ClassVar[str] = "quantize"
    shadow: bool = True  # run the float shadow path for clipped activations
    # "auto": the clipped scale where max-abs >= outlier_threshold x clipped (shadow on), else max-abs;
    # "maxabs" / "clipped": force one choice for every layer.
    scale: str = "auto"
    clip_percentile: float = 99.9  # the clipped range removes the top (100 - p)% of |x|
    outlier_threshold: float = 4.0
    smoothquant: float | None = None  # SmoothQuant alpha (e.g. 0.5); None = off
    samples_per_batch: int = 65536  # |x| elements sampled per batch and layer for the percentile

    def validate(self):
        super().validate()
        _check(isinstance(self.shadow, bool), "w8a8: shadow must be true or false")
        _check(self.scale in ("auto", "maxabs", "clipped"), f"w8a8: scale must be auto, maxabs or clipped, got {self.scale!r}")
        _check(50 < self.clip_percentile <= 100, f"w8a8: clip_percentile must be in (50, 100], got {self.clip_percentile}")
        _check(self.outlier_threshold >= 1, f"w8a8: outlier_threshold must be >= 1, got {self.outlier_threshold}")
        _check(self.smoothquant is None or 0 < self.smoothquant < 1, f"w8a8: smoothquant alpha must be in (0, 1), got {self.smoothquant}")
        _check(isinstance(self.samples_per_batch, int) and self.samples_per_batch >= 1000, "w8a8: samples_per_batch must be >= 1000")
        return self


@dataclass
class _Sparse(_Base):
    kind: ClassVar[str] = "sparsify"
    pattern: str = "2:4"

    @property
    def nm(self) -> tuple[int, int]:
        from .nm import parse_pattern

        return parse_pattern(self.pattern)

    def validate(self):
        super().validate()
        n, m = self.nm
        self.pattern = f"{n}:{m}"
        return self


@dataclass
class MagnitudeConfig(_Sparse):
    """Keep the N largest |w| of every M consecutive inputs."""

    method: ClassVar[str] = "magnitude"


@dataclass
class WandaConfig(_Sparse):
    """Wanda: keep the N largest |w_ij| * ||X_j||_2 of every group (no weight update)."""

    method: ClassVar[str] = "wanda"


@dataclass
class SparseGPTConfig(_Sparse):
    """SparseGPT: OBS mask selection (saliency w_j^2 / [H^-1]_jj) with the OBS weight update, lazy blocks."""

    method: ClassVar[str] = "sparsegpt"
    damp: float = 0.01
    block_size: int = 128
    sequential: bool = True

    def validate(self):
        super().validate()
        _check(0 <= self.damp < 1, f"sparsegpt: damp must be in [0, 1), got {self.damp}")
        _check(isinstance(self.block_size, int) and self.block_size >= 1, "sparsegpt: block_size must be >= 1")
        return self


@dataclass
class MaskLLMConfig(_Sparse):
    """MaskLLM: a learnable categorical distribution over the C(M, N) masks of every group (Gumbel-softmax,
    temperature tau and logit scale kappa annealed linearly), initialised from a one-shot prior mask,
    weights frozen, trained on calibration data to match the dense model's outputs."""

    method: ClassVar[str] = "maskllm"
    steps: int = 400  # optimizer steps (one per forward call inside forward_loop)
    lr: float = 0.05
    tau: tuple[float, float] = (4.0, 0.05)
    kappa: tuple[float, float] = (100.0, 500.0)
    prior: str | None = "sparsegpt"  # one-shot mask the logits start from: sparsegpt | wanda | magnitude | none
    prior_strength: float = 3.0
    init_std: float = 0.01
    weight_reg: float = 1e-5  # rewards keeping large weights, decays linearly to 0
    objective: str = "kl"  # kl (outputs are logits) | mse (any output)
    # "answers": only the output positions the forward_loop marks in its `loss_masks` (the calibration
    # loops of edgemm.compress.calibration mark the positions that predict answer tokens); "all": every
    # output position. Without loss_masks on the loop, "answers" falls back to "all".
    positions: str = "all"
    # After the masks are learned, update the kept weights with SparseGPT's OBS reconstruction under the
    # fixed masks (block by block on calibration data). Not in the MaskLLM paper (weights stay frozen there).
    reconstruct: bool = False
    seed: int = 0

    def validate(self):
        super().validate()
        if isinstance(self.prior, str) and self.prior.lower() == "none":
            self.prior = None
        self.tau, self.kappa = tuple(self.tau), tuple(self.kappa)
        _check(isinstance(self.steps, int) and self.steps >= 1, "maskllm: steps must be >= 1")
        _check(self.lr > 0, "maskllm: lr must be > 0")
        _check(len(self.tau) == 2 and all(t > 0 for t in self.tau), "maskllm: tau must be [start, end], both > 0")
        _check(len(self.kappa) == 2 and all(k > 0 for k in self.kappa), "maskllm: kappa must be [start, end], both > 0")
        _check(self.prior in (None, "sparsegpt", "wanda", "magnitude"), f"maskllm: prior must be sparsegpt, wanda, magnitude or none, got {self.prior!r}")
        _check(self.prior_strength >= 0, "maskllm: prior_strength must be >= 0")
        _check(self.objective in ("kl", "mse"), f"maskllm: objective must be kl or mse, got {self.objective!r}")
        _check(self.positions in ("all", "answers"), f"maskllm: positions must be all or answers, got {self.positions!r}")
        return self


CONFIGS: dict[str, type] = {c.method: c for c in (RTNConfig, GPTQConfig, AWQConfig, W8A8Config, MagnitudeConfig,
                                                   WandaConfig, SparseGPTConfig, MaskLLMConfig)}
QUANT_METHODS = tuple(m for m, c in CONFIGS.items() if c.kind == "quantize")
SPARSE_METHODS = tuple(m for m, c in CONFIGS.items() if c.kind == "sparsify")


def config_from_dict(d: dict):
    """{"method": "gptq", "bits": 4, "group_size": 32} -> GPTQConfig(...), validated."""
    if not isinstance(d, dict):
        raise EdgemmError(f"a compression config must be a mapping with a 'method', got {type(d).__name__}")
    d = dict(d)
    method = d.pop("method", None)
    if method is None:
        raise EdgemmError(f"a compression config needs a 'method' (one of {', '.join(CONFIGS)})")
    cls = CONFIGS.get(str(method).lower())
    if cls is None:
        raise EdgemmError(f"unknown compression method {method!r}; choose one of {', '.join(CONFIGS)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise EdgemmError(f"{cls.method}: unknown option {unknown[0]!r} (valid: {', '.join(sorted(names))})")
    if "group_size" in d and d["group_size"] in (None, "channel", "per-channel", -1):
        d["group_size"] = 0
    try:
        cfg = cls(**d)
    except TypeError as e:
        raise EdgemmError(f"{cls.method}: {e}") from None
    return cfg.validate()
