"""Deployment targets: each writes a complete bundle (every artifact with sha256, role, runtime, lane and
processor, plus the manifest's `deployment` section), its default runtime runs it, and a failed export
leaves no bundle. One tiny model (widths XNNPACK and Core ML quantize), small calibration sets."""

from __future__ import annotations

import json

import pytest

from conftest import random_model, tiny_config

from edgemm.errors import EdgemmError

FAST = {"native": {"calib_n": 4}}  # the native engine's W8A8 calibration on 4 questions (default 128)


def tiny_lm(tokenizer, seed=21):
    from edgemm.models.checkpoint import LoadedModel
    from edgemm.models.config import TextConfig
    from edgemm.processor import Processor

    cfg = tiny_config()
    cfg.text = TextConfig(vocab_size=cfg.text.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=16, intermediate_size=96, max_position_embeddings=64)
    cfg.validate()
    return LoadedModel(random_model(cfg, seed=seed), Processor(tokenizer, cfg), "tiny-targets")


@pytest.fixture(scope="module")
def lm(demo_tokenizer):
    return tiny_lm(demo_tokenizer)


def check_bundle(out, manifest, target):
    from edgemm.export.bundle import LANES, read_manifest

    assert read_manifest(out, verify=True) == manifest  # every artifact present, sha256 verified
    assert manifest["target"] == target and (out / "tokenizer.json").is_file()
    for a in manifest["artifacts"]:
        assert len(a["sha256"]) == 64 and a["bytes"] > 0 and a["role"] and a["lane"] in LANES and a["processor"]
    dep = manifest["deployment"]
    assert dep["target"] == target and dep["default_runtime"] == manifest["artifacts"][0]["runtime"]
    listed = {x["file"] for r in dep["runs"] for x in r["artifacts"]}
    assert listed == {a["file"] for a in manifest["artifacts"] if a["runtime"]}
    for r in dep["runs"]:
        assert r["placement"] and set(r["lanes"]) <= set(LANES)
    return {r["runtime"]: r for r in dep["runs"]}


def roles(manifest, runtime):
    return sorted((a["role"], a["precision"], a["lane"]) for a in manifest["artifacts"] if a["runtime"] == runtime)


def test_laptop(lm, tmp_path):
    from edgemm.export import export

    out = tmp_path / "laptop"
    m = export(lm, "laptop", out, max_context=48, **FAST)
    runs = check_bundle(out, m, "laptop")
    assert list(runs) == ["onnxruntime", "llamacpp", "native"]
    assert roles(m, "onnxruntime") == [("decoder", "int8", "cpu"), ("embed_tokens", "fp32", "cpu"),
                                       ("vision_encoder", "int8", "cpu")]
    assert roles(m, "llamacpp") == [("mmproj", "f16", "cpu"), ("text_model", "q8_0", "cpu")]
    assert roles(m, "native") == [("model", "w8a8-int4", "npu")]
    from edgemm import runtimes

    s = runtimes.load(out)  # the default runtime (onnxruntime) runs the bundle
    assert s.runtime == "onnxruntime" and isinstance(s.generate(None, "what is it?", max_new_tokens=3), str)


def test_android_cpu(lm, tmp_path):
    from edgemm.export import export

    out = tmp_path / "acpu"
    m = export(lm, "android-cpu", out, max_context=48, **FAST)
    runs = check_bundle(out, m, "android-cpu")
    assert list(runs) == ["executorch", "native"]
    (pte,) = [a for a in m["artifacts"] if a["runtime"] == "executorch"]
    assert (pte["file"], pte["precision"], pte["extra"]["max_context_len"]) == ("model.pte", "8da4w", 48)
    from edgemm import runtimes

    s = runtimes.load(out)
    assert s.runtime == "executorch" and isinstance(s.generate(None, "what is it?", max_new_tokens=3), str)


def test_android_npu(lm, tmp_path):
    from edgemm.export import export

    out = tmp_path / "anpu"
    m = export(lm, "android-npu", out, max_context=48, chunk_size=16, **FAST)
    runs = check_bundle(out, m, "android-npu")
    assert list(runs) == ["onnxruntime", "native"]
    assert (m["chunk_size"], m["max_context"]) == (16, 48)
    onnx = roles(m, "onnxruntime")
    assert ("prefill_layer", "w8a8", "npu") in onnx and ("decoder", "int4", "cpu") in onnx
    assert any(r == "shadow" and lane == "cpu" for r, _, lane in onnx)
    assert "QNN" in runs["onnxruntime"]["placement"]
    nat = next(a for a in m["artifacts"] if a["runtime"] == "native")
    assert nat["lane"] == "npu" and nat["extra"]["decode_lane"] == "cpu"


def test_ios(lm, tmp_path):
    from edgemm.export import export

    out = tmp_path / "ios"
    m = export(lm, "ios", out, max_context=32, native=False)
    runs = check_bundle(out, m, "ios")
    assert list(runs) == ["coreml"]
    assert roles(m, "coreml") == [("decoder", "int4", "cpu"), ("embed_tokens", "fp16", "cpu"),
                                  ("vision_encoder", "int8", "cpu")]
    assert "macOS" in runs["coreml"]["verified_here"]
    assert not any("native" in a["file"] for a in m["artifacts"])


def test_failed_export_leaves_no_bundle(lm, tmp_path, monkeypatch):
    """A format failing after others wrote their files: nothing at `out`, an existing bundle untouched."""
    from edgemm.export import export
    from edgemm.export import gguf

    def broken(*a, **k):
        raise EdgemmError("gguf writer failed")

    monkeypatch.setattr(gguf, "write", broken)
    out = tmp_path / "laptop"
    with pytest.raises(EdgemmError, match="gguf writer failed"):
        export(lm, "laptop", out, native=False)  # ONNX int8 is written first, then GGUF fails
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"keep": True}))
    with pytest.raises(EdgemmError):
        export(lm, "laptop", out, native=False)
    assert json.loads((out / "manifest.json").read_text()) == {"keep": True}


def test_bad_options_are_one_line_errors(lm, tmp_path):
    from typer.testing import CliRunner

    from edgemm.cli import app
    from edgemm.export import export

    with pytest.raises(EdgemmError, match="picks its own precisions"):
        export(lm, "laptop", tmp_path / "a", precision="int4")
    with pytest.raises(EdgemmError, match="unknown option"):
        export(lm, "ios", tmp_path / "b", bogus=1)
    with pytest.raises(EdgemmError, match="must be a dict"):
        export(lm, "android-cpu", tmp_path / "c", executorch="8da8w")
    with pytest.raises(EdgemmError, match="unknown executorch precision"):
        export(lm, "android-cpu", tmp_path / "d", executorch={"precision": "int3"}, native=False)
    assert list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(app, ["export", "demo", "--target", "ios", "-o", str(tmp_path / "e"), "--precision", "fp16"])
    assert r.exit_code != 0 and "picks its own precisions" in str(r.exception or r.output)
