"""Compressed EdgeVLM checkpoints: save/load round trips, the tensor names of docs/formats.md, the CLI
(`edgemm quantize`, `edgemm sparsify`, `edgemm info`), and an end-to-end run on the demo model."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import random_model, tiny_config
from edgemm.cli import main
from edgemm.compress import apply, config_from_dict, weight_bytes
from edgemm.compress.calibration import shapes_forward_loop
from edgemm.compress.modules import QuantLinear, W8A8Linear
from edgemm.compress.nm import satisfies
from edgemm.errors import EdgemmError
from edgemm.models.checkpoint import load_checkpoint, save_checkpoint
from edgemm.processor import Processor
from test_compress_quant import one_thread  # noqa: F401

STAGES = {
    "int4-sym": [{"method": "rtn", "bits": 4, "group_size": 16}],
    "int8-asym": [{"method": "rtn", "bits": 8, "group_size": 16, "symmetric": False}],
    "gptq-int4-asym": [{"method": "gptq", "bits": 4, "group_size": 16, "symmetric": False}],
    "awq-int8-channel": [{"method": "awq", "bits": 8, "group_size": 0}],
    "w8a8-shadow": [{"method": "w8a8", "scale": "clipped"}],
    "2:4+int4": [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "gptq", "bits": 4, "group_size": 16}],
    "2:4-only": [{"method": "wanda", "pattern": "2:4"}],
}


@pytest.fixture(scope="module")
def calib(demo_tokenizer):
    return shapes_forward_loop(Processor(demo_tokenizer, tiny_config()), n=16, batch_size=8)


@pytest.mark.parametrize("stage", list(STAGES))
def test_compressed_checkpoint_round_trips_exactly(stage, tmp_path, demo_tokenizer, calib):
    model = random_model()
    rep = apply(model, [config_from_dict(d) for d in STAGES[stage]], forward_loop=calib)
    assert rep["weight_bytes_after"] == weight_bytes(model)
    ids, mask, px = calib.batches[0]
    with torch.no_grad():
        y = model(ids, px, mask)
    save_checkpoint(model, demo_tokenizer, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    lm = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        y2 = lm.model(ids, px, mask)
    assert torch.equal(y, y2)
    sd, sd2 = model.state_dict(), lm.model.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for name, mod in model.named_modules():
        mod2 = lm.model.get_submodule(name) if name else lm.model
        assert type(mod) is type(mod2), name
        assert getattr(mod, "_edgemm_nm", None) == getattr(mod2, "_edgemm_nm", None), name
    assert lm.model.config.extras == model.config.extras
    assert weight_bytes(lm.model) == weight_bytes(model)
    q = cfg["extras"].get("quantization", {}).get("layers", {})
    s = cfg["extras"].get("sparsity", {}).get("layers", {})
    if stage == "2:4-only":
        assert not q and len(s) == 35
    else:
        assert len(q) == 35 and "text.lm_head" not in q  # every linear but the LM head
    for name, meta in s.items():
        assert (meta["n"], meta["m"]) == (2, 4)
        mod = lm.model.get_submodule(name)
        w = mod.dequantized_weight() if hasattr(mod, "dequantized_weight") else mod.weight
        assert satisfies(w, 2, 4), name


def test_checkpoint_tensor_names_follow_formats_md(tmp_path, demo_tokenizer, calib):
    """The contract with the exporters and the native engine: names, dtypes and shapes in model.safetensors."""
    model = random_model()
    apply(model, config_from_dict({"method": "rtn", "bits": 4, "group_size": 16, "include": ["text.*"], "symmetric": False}))
    apply(model, config_from_dict({"method": "rtn", "bits": 8, "group_size": 0, "include": ["projector.*"]}))
    apply(model, config_from_dict({"method": "w8a8", "include": ["vision.*"]}), forward_loop=calib)
    save_checkpoint(model, demo_tokenizer, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    p = "text.layers.0.mlp.up_proj."  # 48 -> 80, int4 asymmetric, group 16
    assert t[p + "qweight"].dtype == torch.uint8 and t[p + "qweight"].shape == (80, 24)
    assert t[p + "scales"].dtype == torch.float16 and t[p + "scales"].shape == (80, 3)
    assert t[p + "zeros"].dtype == torch.uint8 and t[p + "zeros"].shape == (80, 3) and int(t[p + "zeros"].max()) <= 15
    assert p + "weight" not in t
    p = "projector.linear_1."  # 32 -> 48, int8 symmetric per channel
    assert t[p + "qweight"].dtype == torch.int8 and t[p + "scales"].shape == (48, 1) and p + "zeros" not in t
    assert t[p + "bias"].dtype == torch.float32
    p = "vision.layers.0.mlp.fc1."  # W8A8
    assert t[p + "qweight"].dtype == torch.int8 and t[p + "qweight"].shape == (64, 32)
    assert t[p + "weight_scale"].dtype == torch.float32 and t[p + "weight_scale"].shape == (64,)
    assert t[p + "input_scale"].dtype == torch.float32 and t[p + "input_scale"].shape == ()
    assert t[p + "outlier_channels"].dtype == torch.int32 and t[p + "outlier_channels"].ndim == 1
    assert t["text.lm_head.weight"].dtype == torch.float32


def test_bad_compression_metadata_is_a_clear_error(tmp_path, demo_tokenizer):
    model = random_model()
    apply(model, config_from_dict({"method": "rtn", "bits": 4, "group_size": 16}))
    save_checkpoint(model, demo_tokenizer, tmp_path / "ck")
    cfg_file = tmp_path / "ck" / "config.json"
    good = json.loads(cfg_file.read_text())
    for mutate, msg in [
        (lambda c: c["extras"]["quantization"]["layers"].update({"text.nope": {"format": "int4"}}), "does not have"),
        (lambda c: c["extras"]["quantization"]["layers"]["text.layers.0.mlp.up_proj"].update(format="int3"), "unknown quantized format"),
        (lambda c: c["extras"]["quantization"]["layers"]["text.layers.0.mlp.up_proj"].pop("group_size"), "bad metadata"),
        (lambda c: c["extras"]["quantization"]["layers"]["text.layers.0.mlp.up_proj"].update(in_features=64), "implies"),
        (lambda c: c["extras"]["quantization"]["layers"]["text.layers.0.mlp.up_proj"].update(group_size=5), "up_proj: group size 5"),
        (lambda c: c["extras"].update(quantization={"format_version": 9, "layers": {}}), "format_version 9"),
        (lambda c: c["extras"].update(sparsity={"layers": {"text.layers.0.mlp.up_proj": {"n": 4, "m": 4}}}), "0 < N < M"),
    ]:
        c = json.loads(json.dumps(good))
        mutate(c)
        cfg_file.write_text(json.dumps(c))
        with pytest.raises(EdgemmError, match=msg):
            load_checkpoint(tmp_path / "ck")
    cfg_file.write_text(json.dumps(good))
    load_checkpoint(tmp_path / "ck")


# ------------------------------------------------------------------------------------------------- CLI


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_quantize_sparsify_info(tmp_path, tiny_ckpt, capsys):
    code, out, err = run_cli(["sparsify", str(tiny_ckpt), "-o", str(tmp_path / "sp"), "--method", "wanda",
                              "--calib-n", "8", "--calib-batch-size", "4", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["method"] == "wanda" and rep["layers_touched"] == 35 and rep["calibration"]["data"] == "shapes:8:555"
    code, out, err = run_cli(["quantize", str(tmp_path / "sp"), "-o", str(tmp_path / "q"), "--method", "gptq",
                              "--group-size", "16", "--calib-n", "8", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["weight_bytes_after"] < 0.5 * rep["weight_bytes_before"]
    code, out, err = run_cli(["info", str(tmp_path / "q"), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    layer = info["layers"]["text.layers.1.mlp.down_proj"]
    assert layer["format"] == "int4" and layer["group_size"] == 16 and layer["nm"] == "2:4"
    assert info["formats"]["int4+2:4"]["layers"] == 35 and info["layers"]["text.lm_head"]["format"] == "fp32"
    assert info["weight_bytes"] == rep["weight_bytes_after"] == info["bytes"]["total"]
    code, out, err = run_cli(["info", str(tmp_path / "q")], capsys)  # the table form
    assert code == 0 and "int4 (gptq)" in out and "total weight bytes" in out
    code, out, err = run_cli(["quantize", str(tiny_ckpt), "-o", str(tmp_path / "w"), "--method", "w8a8", "--bits", "8",
                              "--calib-n", "8", "--json"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["info", str(tmp_path / "w"), "--json"], capsys)
    info = json.loads(out)
    w = info["layers"]["text.layers.0.self_attn.q_proj"]
    assert w["format"] == "w8a8" and "outlier_channels" in w and w["shadow"] is True
    code, out, err = run_cli(["eval", str(tmp_path / "w"), "--data", "shapes:4:1", "--json"], capsys)
    assert code == 0 and json.loads(out)["n"] == 4


@pytest.mark.parametrize("args,msg", [
    (["quantize", "{ck}", "-o", "{out}", "--method", "rtn", "--bits", "3"], "bits 3 is not supported"),
    (["quantize", "{ck}", "-o", "{out}", "--method", "rtn", "--group-size", "7"], "group size 7 does not divide in_features"),
    (["quantize", "{ck}", "-o", "{out}", "--method", "hqq"], "unknown quantization method 'hqq'"),
    (["quantize", "{ck}", "-o", "{out}", "--method", "w8a8", "--bits", "4"], "w8a8 is 8-bit"),
    (["sparsify", "{ck}", "-o", "{out}", "--pattern", "4:4"], "need 0 < N < M"),
    (["sparsify", "{ck}", "-o", "{out}", "--method", "magnitude", "--pattern", "2:7"], "divisible by 7"),
    (["sparsify", "{ck}", "-o", "{out}", "--method", "wanda", "--calib", "/nonexistent"], "dataset not found"),
    (["quantize", "{ck}", "-o", "{out}", "--method", "rtn", "--include", "nothing.*"], "no layer matches"),
])
def test_cli_errors_are_one_line(args, msg, tmp_path, tiny_ckpt, capsys):
    args = [a.format(ck=tiny_ckpt, out=tmp_path / "o") for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 1 and "error:" in err and msg in " ".join(err.split()), err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_quantizing_twice_is_refused(tmp_path, tiny_ckpt, capsys):
    assert run_cli(["quantize", str(tiny_ckpt), "-o", str(tmp_path / "q"), "--method", "rtn", "--group-size", "16"], capsys)[0] == 0
    code, out, err = run_cli(["sparsify", str(tmp_path / "q"), "-o", str(tmp_path / "s"), "--method", "magnitude"], capsys)
    assert code == 1 and "already quantized" in err


def test_compress_package_and_cli_stay_torch_free():
    code = "import sys, edgemm.cli, edgemm.compress; from edgemm.compress import config_from_dict; " \
           "config_from_dict({'method': 'gptq'}); print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr


# ---------------------------------------------------------------------------------------- demo model


def test_end_to_end_on_the_demo_model(tmp_path, capsys):
    """quantize (W8A8 + shadow; int8 weight-only) -> checkpoint -> edgemm eval on a slice of the held-out set."""
    from edgemm.data import HELDOUT

    n = 96
    data = f"shapes:{HELDOUT.split(':')[1]}:{HELDOUT.split(':')[2]}"
    accs = {}
    for name, args in (("fp32", None),
                       ("w8a8", ["quantize", "demo", "-o", str(tmp_path / "w8a8"), "--method", "w8a8", "--bits", "8", "--calib-n", "32"]),
                       ("int8", ["quantize", "demo", "-o", str(tmp_path / "int8"), "--method", "rtn", "--bits", "8", "--group-size", "0"])):
        if args:
            code, out, err = run_cli(args + ["--json"], capsys)
            assert code == 0, err
            assert json.loads(out)["layers_touched"] == 81
        code, out, err = run_cli(["eval", "demo" if name == "fp32" else str(tmp_path / name), "--data", data,
                                  "--limit", str(n), "--json"], capsys)
        assert code == 0, err
        accs[name] = json.loads(out)["accuracy"]
    assert accs["fp32"] > 0.5, accs  # a trained model
    assert accs["w8a8"] >= accs["fp32"] - 0.03 and accs["int8"] >= accs["fp32"] - 0.03, accs


def test_calibration_loop_batches_and_answer_masks(demo_tokenizer):
    """The calibration loop feeds prompt + answer (teacher-forced); its loss masks mark exactly the
    output positions whose next token is an answer token, as the training labels do."""
    from edgemm.data import load_dataset
    from edgemm.train.data import IGNORE, merged_labels

    proc = Processor(demo_tokenizer, tiny_config())
    loop = shapes_forward_loop(proc, n=10, batch_size=4)
    assert len(loop) == 10 and len(loop.batches) == 3 and len(loop.loss_masks) == 3
    recs = load_dataset("shapes:10:555").records
    model = random_model()
    k = proc.config.num_visual_tokens
    for b, ((ids, mask, px), lm) in enumerate(zip(loop.batches, loop.loss_masks)):
        with torch.no_grad():
            out = model(ids, px, mask)
        assert tuple(lm.shape) == tuple(out.shape[:2])
        labels = torch.full_like(ids, IGNORE)
        for j, r in enumerate(recs[4 * b:4 * b + ids.shape[0]]):
            p, a = proc.encode_prompt(r.question), proc.encode_answer(r.answer)
            assert ids[j, :len(p) + len(a)].tolist() == p + a and int(mask[j].sum()) == len(p) + len(a)
            labels[j, len(p):len(p) + len(a)] = torch.tensor(a)
        want = merged_labels(labels, ids, proc.config.image_token_id, k)[:, 1:] != IGNORE
        assert torch.equal(lm[:, :-1], want) and not lm[:, -1].any()


def test_tied_lm_head_is_refused_and_skipped_by_default():
    from edgemm.models.config import TextConfig

    cfg = tiny_config()
    cfg.text = TextConfig(**{**cfg.text.__dict__, "tie_word_embeddings": True})
    model = random_model(cfg.validate())
    with pytest.raises(EdgemmError, match="shares its weight"):
        apply(model, config_from_dict({"method": "rtn", "bits": 8, "group_size": 0, "include": ["text.*"], "exclude": []}))
    rep = apply(model, config_from_dict({"method": "rtn", "bits": 8, "group_size": 0}))
    assert "text.lm_head" not in rep["layers"] and model.text.lm_head.weight is model.text.embed_tokens.weight
