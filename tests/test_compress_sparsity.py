"""N:M sparsity (edgemm.compress: magnitude, Wanda, SparseGPT, MaskLLM) against plain references."""

import numpy as np
import pytest
import torch
from torch import nn

from edgemm.compress import apply, config_from_dict
from edgemm.compress.nm import candidates, group_nonzeros
from edgemm.compress.sparsegpt import sparsegpt_weight
from edgemm.errors import EdgemmError
from test_compress_quant import NormBlock, correlated_inputs, layer, loop_over, one_thread, out_err  # noqa: F401


def prune(model, method, pattern="2:4", x=None, **kw):
    cfg = config_from_dict({"method": method, "pattern": pattern, "exclude": [], **kw})
    return apply(model, cfg, forward_loop=None if x is None else loop_over(x))


FAST_MASKLLM = {"steps": 60, "lr": 0.05}


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "maskllm"])
def test_every_group_has_exactly_n_nonzeros(method, pattern):
    n, m = map(int, pattern.split(":"))
    x = correlated_inputs(t=512)
    model = nn.Sequential(layer(), nn.GELU(), layer(48, 32, seed=2))
    extra = dict(FAST_MASKLLM, steps=10) if method == "maskllm" else {}
    rep = prune(model, method, pattern, None if method == "magnitude" else x, **extra)
    assert rep["layers_touched"] == 2
    for lin in (model[0], model[2]):
        nz = group_nonzeros(lin.weight.detach(), m)
        assert bool((nz == n).all()), (method, pattern, nz.unique())
        assert lin._edgemm_nm == {"n": n, "m": m, "method": method}


def test_wanda_matches_a_naive_reference():
    x = correlated_inputs(t=300)
    lin = layer()
    m = nn.Sequential(layer())
    prune(m, "wanda", "2:4", x)
    w = lin.weight.detach().numpy()
    norms = np.sqrt((x.double().numpy() ** 2).sum(0))
    ref = np.zeros_like(w)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], 4):
            score = np.abs(w[r, g:g + 4]) * norms[g:g + 4]
            keep = np.argsort(-score)[:2]
            ref[r, g + keep] = w[r, g + keep]
    assert np.array_equal(m[0].weight.detach().numpy(), ref)


def naive_sparsegpt(W, H, n, m, damp):
    """OBS pruning column by column in float64 with an explicit inverse Hessian update. As in the
    SparseGPT paper's code, the saliency of column j is w_j^2 / d_j with d_j = [(H_{j:, j:})^-1]_00,
    the inverse Hessian of the columns not yet processed when j's turn comes."""
    W = W.double().clone()
    H = H.double().clone()
    k = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    d = torch.tensor([float(torch.linalg.inv(H[j:, j:])[0, 0]) for j in range(k)], dtype=torch.float64)
    keep = torch.zeros_like(W, dtype=torch.bool)
    for i in range(k):
        if i % m == 0:
            sal = W[:, i:i + m] ** 2 / d[i:i + m][None, :]
            keep[:, i:i + m].scatter_(1, sal.topk(n, dim=1).indices, True)
        q = torch.where(keep[:, i], W[:, i], torch.zeros_like(W[:, i]))
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        W[:, i] = q
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return W, keep


def test_sparsegpt_matches_the_naive_obs_reference():
    x = correlated_inputs(t=1024, k=48)
    lin = layer(k=48, n=16)
    H = 2 * x.T @ x / x.shape[0]
    ref, keep_ref = naive_sparsegpt(lin.weight.detach(), H, 2, 4, 0.01)
    for bs in (128, 8):
        w, keep = sparsegpt_weight(lin.weight, H, 2, 4, damp=0.01, block_size=bs)
        assert (keep != keep_ref).float().mean() < 0.01
        assert float((w.double() - ref).abs().max()) < 1e-3 * float(ref.abs().max())


def test_sparsegpt_and_wanda_beat_magnitude_on_correlated_inputs():
    x = correlated_inputs()
    ref = NormBlock()
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = NormBlock()
        prune(m, method, "2:4", x)
        errs[method] = out_err(m, ref, correlated_inputs(draw=5))
    assert errs["sparsegpt"] < 0.7 * errs["magnitude"], errs
    assert errs["wanda"] < errs["magnitude"], errs


def test_maskllm_learned_masks_beat_magnitude_on_a_small_layer():
    x = correlated_inputs(t=1024)
    ref = NormBlock()
    errs, reps = {}, {}
    for method, kw in (("magnitude", {}), ("maskllm", {"steps": 100, "lr": 0.05, "prior": "magnitude", "objective": "mse"})):
        m = NormBlock()
        reps[method] = prune(m, method, "2:4", x, **kw)
        errs[method] = out_err(m, ref, correlated_inputs(draw=5))
    assert errs["maskllm"] < 0.8 * errs["magnitude"], errs
    rep = reps["maskllm"]
    assert rep["steps"] == 100 and rep["changed_vs_prior"] > 0  # it learned something beyond its prior
    assert rep["history"][-1]["loss"] < rep["history"][0]["loss"]


def test_maskllm_candidates_and_forward_loop_checks():
    c = candidates(2, 4)
    assert c.shape == (6, 4) and bool((c.sum(1) == 2).all()) and len({tuple(r.tolist()) for r in c}) == 6
    assert candidates(4, 8).shape == (70, 8)
    with pytest.raises(EdgemmError, match="candidate masks"):
        candidates(8, 16)
    x = correlated_inputs(t=64)

    def no_grad_loop(model):
        with torch.no_grad():
            model(x)

    m = nn.Sequential(layer())
    w0 = m[0].weight.detach().clone()
    with pytest.raises(EdgemmError, match="without autograd"):
        apply(m, config_from_dict({"method": "maskllm", "steps": 3, "exclude": [], "prior": "magnitude"}), forward_loop=no_grad_loop)
    assert isinstance(m[0], nn.Linear) and torch.equal(m[0].weight, w0)  # left dense and untouched
    calls = iter(range(100))

    def shifting_loop(model):
        model(x[: 32 + next(calls)])

    with pytest.raises(EdgemmError, match="same batches"):
        apply(m, config_from_dict({"method": "maskllm", "steps": 3, "exclude": [], "prior": "magnitude"}), forward_loop=shifting_loop)


@pytest.mark.parametrize("qmethod", ["rtn", "gptq", "awq"])
def test_quantizing_a_sparse_model_keeps_the_zeros(qmethod):
    x = correlated_inputs(t=512)
    m = NormBlock()
    prune(m, "sparsegpt", "2:4", x)
    apply(m, config_from_dict({"method": qmethod, "bits": 4, "group_size": 16, "exclude": []}), forward_loop=loop_over(x))
    for name in ("mlp.fc1", "mlp.fc2"):
        q = m.get_submodule(name)
        assert q._edgemm_nm["n"] == 2 and q.metadata()["format"] == "int4"
        w = q.dequantized_weight()
        assert bool((group_nonzeros(w, 4) <= 2).all())
        u, s, z = q.codes()
        assert bool((u[w == 0] == z.repeat_interleave(16, 1)[w == 0]).all())  # a zero weight has code `zero`
    # W8A8 too
    m = NormBlock()
    prune(m, "magnitude", "2:4")
    apply(m, config_from_dict({"method": "w8a8", "exclude": []}), forward_loop=loop_over(x))
    assert bool((group_nonzeros(m.mlp.fc1.qweight, 4) <= 2).all())


def test_bad_sparsity_inputs():
    with pytest.raises(EdgemmError, match="divisible by 4"):
        prune(nn.Sequential(layer(k=30)), "magnitude", "2:4")
    with pytest.raises(EdgemmError, match="need 0 < N < M"):
        config_from_dict({"method": "sparsegpt", "pattern": "0:4"})
    with pytest.raises(EdgemmError, match="forward_loop"):
        prune(nn.Sequential(layer()), "wanda", "2:4")


def test_obs_update_under_a_fixed_mask_keeps_it_and_lowers_the_error():
    """The reconstruction MaskLLM can run after learning its masks (reconstruct=True)."""
    from edgemm.compress.magnitude import magnitude_mask

    x = correlated_inputs(t=1024)
    lin = layer()
    W = lin.weight.detach()
    keep = magnitude_mask(W, 2, 4)
    H = 2 * x.T @ x / x.shape[0]
    w, k2 = sparsegpt_weight(W, H, 2, 4, keep=keep)
    assert torch.equal(k2, keep) and torch.equal(w != 0, keep)
    err = lambda ww: float(((x @ (ww - W).T) ** 2).mean())  # noqa: E731
    assert err(w) < 0.9 * err(W * keep)  # (weakly correlated inputs: little room to compensate)
