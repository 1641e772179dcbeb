"""edgemm bench: the demo preset end to end (torch + onnxruntime, tiny token counts), the JSON schema,
the export cache, layer-scaling arithmetic and one-line errors for bad input."""

import json

import pytest

from edgemm.cli import main


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out, chart = d / "report.json", d / "bench.png"
    rc = main(["bench", "--preset", "demo", "--runtime", "torch,onnxruntime", "--precision", "fp32",
               "--prompt-tokens", "16,32", "--decode-tokens", "4", "--decode-context", "8", "--repeats", "1",
               "--cache-dir", str(d / "cache"), "--out", str(out), "--chart", str(chart)])
    assert rc == 0
    return json.loads(out.read_text()), d


def test_demo_end_to_end_schema(demo_report):
    rep, d = demo_report
    assert rep["preset"] == "demo" and rep["threads"] == 2
    assert rep["settings"]["prompt_tokens"] == [16, 32]
    got = {(r["runtime"], r["precision"]): r for r in rep["results"]}
    assert set(got) == {("torch", "fp32"), ("onnxruntime", "fp32")}
    for r in got.values():
        assert r["status"] == "ok", r
        assert set(r["prefill_tok_s"]) == {"16", "32"} and all(v > 0 for v in r["prefill_tok_s"].values())
        assert r["decode_tok_s"] > 0
        assert r["image_encode_ms"] > 0
        assert r["ttft_ms"]["full"] > 0 and r["ttft_ms"]["pruned"] > 0
        # fastervlm:0.25 of the demo's 64 visual tokens
        assert r["ttft"]["full"]["visual_tokens"] == 64 and r["ttft"]["pruned"]["visual_tokens"] == 16
        assert r["peak_rss_mb"] > 50
        assert 0 < r["int8_peak_fraction"]["16"] < 1.5 and 0 < r["bandwidth_fraction"] < 1.5
    assert got[("onnxruntime", "fp32")]["export"]["cached"] is False
    assert (d / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_cache_is_reused_and_keyed(demo_report):
    from edgemm.bench.core import Bench

    _, d = demo_report
    b = Bench("demo", cache_dir=d / "cache", prompt_tokens=(16,))
    meta = b.ensure_export("onnxruntime", "fp32", None)
    assert meta["cached"] is True and (d / "cache" / "demo" / "onnxruntime-fp32" / "bundle" / "manifest.json").is_file()
    _, k1 = b._entry("onnxruntime", "fp32", None)
    _, k2 = b._entry("onnxruntime", "int8", None)
    _, k3 = Bench("demo", cache_dir=d / "cache", seed=1, prompt_tokens=(16,))._entry("onnxruntime", "fp32", None)
    assert len({json.dumps(k, sort_keys=True) for k in (k1, k2, k3)}) == 3


def test_load_renders_saved_report(demo_report, capsys):
    rep, d = demo_report
    capsys.readouterr()
    assert main(["bench", "--load", str(d / "report.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == rep["results"]


def test_extrapolation_is_linear_in_layers():
    from edgemm.bench.core import extrapolate

    def run(layers):  # t = 0.5 s + 0.1 s per layer at 100 tokens; decode 0.01 + 0.002 s/layer per token
        t = 0.5 + 0.1 * layers
        return {"repeats": 3, "prefill_tok_s": {"100": 100 / t}, "prefill_s": {"100": {"median_s": t}},
                "decode_tok_s": 1 / (0.01 + 0.002 * layers), "decode_context_avg": 70.0,
                "ttft_ms": {"full": 100 + 10 * layers}, "image_encode_ms": 40.0, "ttft": {"full": {"visual_tokens": 9}},
                "peak_rss_mb": 100.0 + 50 * layers, "loadavg_1m": [1.0, 1.0]}

    out = extrapolate([run(1), run(4)], [1, 4], 24)
    assert out["prefill_tok_s"]["100"] == pytest.approx(100 / (0.5 + 2.4), rel=1e-3)
    assert out["decode_tok_s"] == pytest.approx(1 / (0.01 + 0.048), rel=1e-3)
    assert out["ttft_ms"]["full"] == pytest.approx(340)
    assert out["peak_rss_mb"] == pytest.approx(1300) and out["peak_rss_estimated"] is True


def test_fractions_use_real_work():
    from edgemm.bench.metrics import (AMX_INT8_GMACS_PER_CORE, VNNI_GMACS_PER_CORE, VNNI_ZEN4_GMACS_PER_CORE,
                                      decode_bytes_per_token, fractions, int8_gmacs_per_core, linear_macs_per_token,
                                      vnni_gmacs_per_core)
    from edgemm.bench.presets import preset_config

    cfg = preset_config("llava-qwen1.8b")
    # Qwen1.5-1.8B's decoder linear layers: 24 x (4 x 2048^2 + 3 x 2048 x 5504) MACs per token
    assert linear_macs_per_token(cfg.text) == 24 * (4 * 2048 * 2048 + 3 * 2048 * 5504)
    fr = fractions({"prefill_tok_s": {"512": 100.0}, "decode_tok_s": 10.0, "decode_context_avg": 0.0}, cfg, 2, "llamacpp", "q8_0")
    gmacs = fr["prefill_gmacs_per_token"]["512"]
    assert 1.23 < gmacs < 1.25  # linear layers 1.21 + causal attention (0.025) + one lm_head row per 512
    assert fr["vnni_peak_fraction"]["512"] == pytest.approx(gmacs * 100 / (2 * vnni_gmacs_per_core()), abs=1e-4)
    assert fr["int8_peak_fraction"]["512"] == pytest.approx(gmacs * 100 / (2 * int8_gmacs_per_core()), abs=1e-4)
    assert int8_gmacs_per_core({"avx512_vnni"}, "GenuineIntel") == VNNI_GMACS_PER_CORE
    assert int8_gmacs_per_core({"avx512_vnni"}, "AuthenticAMD") == VNNI_ZEN4_GMACS_PER_CORE
    assert int8_gmacs_per_core({"avx512_vnni", "amx_int8"}) == AMX_INT8_GMACS_PER_CORE
    b = decode_bytes_per_token(cfg.text, "llamacpp", "q8_0", 0)
    assert fr["bandwidth_fraction"] == pytest.approx(b * 10 / 29e9, rel=1e-3)
    # the KV element size a runtime reports (the native engine's fp16 cache) replaces the table's
    t = cfg.text
    kv_elems = 100 * t.num_layers * 2 * t.num_kv_heads * t.head_dim
    w = decode_bytes_per_token(t, "native", "w8a8-int4", 0, weight_bytes=1e6)
    assert w == 1e6
    assert decode_bytes_per_token(t, "native", "w8a8-int4", 100, weight_bytes=1e6) == 1e6 + 4 * kv_elems
    assert decode_bytes_per_token(t, "native", "w8a8-int4", 100, weight_bytes=1e6, kv_bytes=2) == 1e6 + 2 * kv_elems


@pytest.mark.parametrize("args, msg", [
    (["--preset", "llama-70b"], "unknown bench preset 'llama-70b'"),
    (["--runtime", "tensorrt"], "unknown runtime 'tensorrt'"),
    (["--runtime", "torch", "--precision", "q4_0"], "precision 'q4_0' is not one of"),
    (["--prompt-tokens", "512,abc"], "--prompt-tokens takes comma-separated integers"),
    (["--prompt-tokens", "4096"], "prompt tokens must be in 1..2040"),
    (["--token-compression", "nosuch:0.5"], "nosuch"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--runtime", "torch", "--precision", "llamacpp:q4_0"], "names runtime 'llamacpp', which --runtime does not include"),
    (["--runtime", "native", "--precision", "native:q4_0"], "runtime native has no precision 'q4_0'"),
])
def test_bad_input_is_one_line_error(args, msg, capsys, tmp_path):
    assert main(["bench", "--cache-dir", str(tmp_path), *args]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and msg in err.replace("\n", " ")
    assert "Traceback" not in err


def test_pinned_precisions_pick_pairs(monkeypatch, tmp_path):
    from edgemm.bench import core

    seen = []
    monkeypatch.setattr(core.Bench, "one", lambda self, r, p: seen.append((r, p)) or {"runtime": r, "precision": p, "status": "ok"})
    rep = core.run_bench("demo", ["torch", "onnxruntime", "native"], ["bf16", "onnxruntime:int8", "native:w8a8-int4"],
                         cache_dir=tmp_path)
    assert seen == [("torch", "bf16"), ("onnxruntime", "int8"), ("native", "w8a8-int4")]
    assert [r["precision"] for r in rep["results"]] == ["bf16", "int8", "w8a8-int4"]


def test_a_noisy_pruned_ttft_drops_that_figure_only():
    """The pruned TTFT's text part is small: noise can make the deeper run faster. That figure is dropped
    (and said so), the prefill/decode extrapolation stands."""
    from edgemm.bench.core import extrapolate

    def run(layers, pruned):
        return {"repeats": 3, "prefill_tok_s": {"100": 100.0}, "prefill_s": {"100": {"median_s": 0.5 + 0.1 * layers}},
                "decode_tok_s": 50.0 / layers, "decode_context_avg": 70.0, "image_encode_ms": 640.0,
                "ttft_ms": {"full": 700 + 100 * layers, "pruned": pruned}, "peak_rss_mb": 100.0, "loadavg_1m": [1.0],
                "ttft": {"full": {"visual_tokens": 576}, "pruned": {"visual_tokens": 144}}}

    out = extrapolate([run(1, 831.6), run(4, 785.0)], [1, 4], 24)
    assert out["ttft_ms"] == {"full": pytest.approx(3100)} and "noise" in out["unscaled"]["ttft_ms.pruned"]
    assert out["prefill_tok_s"]["100"] == pytest.approx(100 / 2.9, rel=1e-3)


def test_ttft_work_ratio_bounds_post_vision_pruning():
    from edgemm.bench.metrics import prefill_macs, ttft_macs, ttft_work_ratio, vision_macs
    from edgemm.bench.presets import preset_config

    cfg = preset_config("llava-qwen1.8b")
    # CLIP-L/14-336, 23 blocks of 577 tokens: 12.6 M linear MACs per token and block + attention + patches
    blk = 577 * (4 * 1024 ** 2 + 2 * 1024 * 4096) + 2 * 577 ** 2 * 1024
    assert vision_macs(cfg) == 576 * 3 * 14 * 14 * 1024 + 23 * blk
    assert ttft_macs(cfg, 43, 144) == vision_macs(cfg) + 144 * (1024 * 2048 + 2048 ** 2) + prefill_macs(cfg.text, 187)
    r = ttft_work_ratio(cfg, 43, 576, 144)
    assert 2.3 < r < 2.34  # below the 2.5x: the 183 GMAC vision encoder is paid in both
    assert ttft_work_ratio(cfg, 43, 576, 576) == 1.0
    # selecting inside the encoder after block 14: blocks 15-22 run on 145 tokens
    late = 8 * (145 * (4 * 1024 ** 2 + 2 * 1024 * 4096) + 2 * 145 ** 2 * 1024)
    assert vision_macs(cfg, 14, 144) == 576 * 3 * 14 * 14 * 1024 + 15 * blk + late
    assert 2.6 < ttft_work_ratio(cfg, 43, 576, 144, early_block=14) < 2.65


def test_extrapolation_refuses_a_deeper_model_that_is_not_slower():
    from edgemm.bench.core import _lin
    from edgemm.errors import EdgemmError

    assert _lin(1.0, 4.0, 1, 4, 24) == 24.0
    with pytest.raises(EdgemmError, match="noise"):
        _lin(2.0, 1.5, 1, 4, 24)


def test_a_noisy_scaled_runtime_is_an_error_row_not_the_end_of_the_sweep(monkeypatch, tmp_path):
    from edgemm.bench import core

    monkeypatch.setitem(core.SCALED, ("demo", "onnxruntime"), ((1, 4), "test"))
    monkeypatch.setattr(core.Bench, "ensure_export", lambda self, r, p, layers: {"dir": str(tmp_path)})
    def run(tok_s):
        return {"repeats": 3, "prefill_tok_s": {"512": tok_s}, "prefill_s": {"512": {"median_s": 512 / tok_s}}}

    runs = iter([run(400.0), run(450.0)])  # the deeper model measured faster: noise
    monkeypatch.setattr(core.Bench, "_run", lambda self, r, p, layers, exp: next(runs))
    out = core.Bench("demo", cache_dir=tmp_path).one("onnxruntime", "int8")
    assert out["status"] == "error" and "noise" in out["reason"] and set(out["runs_by_layers"]) == {"1", "4"}


def test_native_decode_bytes_count_the_decode_head_of_tied_models(tmp_path):
    import gguf
    import numpy as np

    from edgemm.bench.exporting import native_decode_bytes

    f = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(f), "edgemm")
    w.add_tensor("text.embed_tokens.weight", np.zeros((50, 8), np.float32))  # tied: no main lm_head
    w.add_tensor("text.layers.0.mlp.up_proj.weight", np.zeros((16, 8), np.float32))
    w.add_tensor("decode.text.layers.0.mlp.up_proj.qweight", np.zeros((16, 4), np.int8))
    w.add_tensor("decode.text.lm_head.qweight", np.zeros((50, 4), np.int8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert native_decode_bytes(f) == 16 * 4 + 50 * 4  # the decode set only, not the fp32 embedding


def test_native_dense_and_2_4_rows(tmp_path):
    """The native rows of the demo preset: the engine reports the packed bytes a decode step reads (2:4
    layers smaller than dense), and the TTFT rows carry the work-ratio bound of the pruned speed-up."""
    from edgemm.bench import core

    rep = core.run_bench("demo", ["native"], ["native:w8a8-int4", "native:w8a8-int4-sp24"], prompt_tokens=[16],
                         decode_tokens=4, decode_context=8, repeats=1, cache_dir=tmp_path)
    got = {r["precision"]: r for r in rep["results"]}
    assert all(r["status"] == "ok" for r in got.values()), got
    dense, sparse = got["w8a8-int4"], got["w8a8-int4-sp24"]
    assert dense["decode_weight_bytes"] > sparse["decode_weight_bytes"] > 0
    assert dense["decode_bytes_per_token"] > sparse["decode_bytes_per_token"]
    for r in (dense, sparse):
        assert r["ttft"]["full"]["prompt_tokens"] > r["ttft"]["full"]["visual_tokens"] == 64
        assert 1.0 < r["ttft_work_ratio"] < 64 / 16
