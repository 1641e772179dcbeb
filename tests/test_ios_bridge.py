"""The iOS demo's engine calls, on the host: ios_demo/host_test/main.c makes the same C ABI calls in the same
order as ios_demo/EdgemmDemo/Engine.swift (checked here from both sources), and it is built and run on a real
bundle of the demo model. (Swift itself needs Xcode: docs/apps.md has the steps.)

Needs a C compiler and the engine library; a missing one fails, it does not skip.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from apps_support import REPO, HEADER_DIR, compiler, libedgemm, native_bundle, native_reference, run, shapes_case, torch_answers

IOS = REPO / "ios_demo"
SWIFT = IOS / "EdgemmDemo" / "Engine.swift"
HOST_C = IOS / "host_test" / "main.c"
MAX_NEW = 16


def abi_functions() -> set[str]:
    src = (HEADER_DIR / "edgemm.h").read_text()
    return set(re.findall(r"EDGEMM_API\s+[\w\s\*]+?\b(edgemm_\w+)\s*\(", src))


def _code_only(src: str) -> str:
    """Source without comments and string literals (so a call named in a comment or a message is not a call)."""
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    src = re.sub(r"//[^\n]*", " ", src)
    return re.sub(r'"(?:\\.|[^"\\\n])*"', '""', src)


def abi_calls(path: Path) -> list[str]:
    """The edgemm_* functions of the C ABI called in a file, in source order (type names like edgemm_stats() are
    not functions of the header and are left out)."""
    fns = abi_functions()
    return [m for m in re.findall(r"\b(edgemm_\w+)\s*\(", _code_only(path.read_text())) if m in fns]


def test_swift_and_host_program_make_the_same_abi_calls_in_the_same_order():
    fns = abi_functions()
    assert {"edgemm_model_load", "edgemm_generate", "edgemm_session_set_image_rgb8"} <= fns and len(fns) >= 20
    swift, c = abi_calls(SWIFT), abi_calls(HOST_C)
    assert len(swift) >= 15, swift
    assert swift == c, f"\nSwift: {swift}\nC:     {c}"
    # Every edgemm_ identifier Swift calls exists in the header (nothing outside the C ABI).
    called = set(re.findall(r"\b(edgemm_[a-z_0-9]+)\s*\(", _code_only(SWIFT.read_text())))
    types = {"edgemm_load_options", "edgemm_generate_options", "edgemm_stats"}
    assert called - types <= fns, called - types - fns


def test_the_order_check_sees_a_swapped_or_missing_call(tmp_path):
    src = HOST_C.read_text()
    swapped = tmp_path / "swapped.c"
    swapped.write_text(src.replace("  edgemm_session_free(e->session);\n  edgemm_model_free(e->model);",
                                   "  edgemm_model_free(e->model);\n  edgemm_session_free(e->session);"))
    assert abi_calls(swapped) != abi_calls(HOST_C) and sorted(abi_calls(swapped)) == sorted(abi_calls(HOST_C))
    missing = tmp_path / "missing.swift"
    missing.write_text(SWIFT.read_text().replace("try Engine.check(edgemm_session_clear_image(session))", "_ = 0"))
    assert abi_calls(missing) != abi_calls(SWIFT)
    commented = tmp_path / "commented.c"
    commented.write_text(src + "\n/* edgemm_generate(x) */\n// edgemm_model_load(y)\n")
    assert abi_calls(commented) == abi_calls(HOST_C)


def test_swift_module_map_and_xcode_spec_reach_the_header():
    mm = (IOS / "CEdgemm" / "module.modulemap").read_text()
    header = re.search(r'header\s+"([^"]+)"', mm).group(1)
    assert (IOS / "CEdgemm" / header).resolve() == (HEADER_DIR / "edgemm.h").resolve()
    assert re.search(r"^import CEdgemm$", SWIFT.read_text(), re.M)
    spec = (IOS / "project.yml").read_text()
    assert "SWIFT_INCLUDE_PATHS: $(SRCROOT)/CEdgemm" in spec and "build/Edgemm.xcframework" in spec
    assert "NSCameraUsageDescription" in spec
    script = (IOS / "build_engine.sh").read_text()
    assert "--target edgemm_engine edgemm_kernels" in script and "-create-xcframework" in script
    native_cm = (REPO / "native" / "CMakeLists.txt").read_text()
    for target in ("edgemm_engine", "edgemm_kernels"):
        assert re.search(rf"add_library\(\s*{target}\s+STATIC", native_cm), f"native/ has no static {target} target"
    # No edgemm_* call outside Engine.swift (the host twin mirrors exactly that file).
    for f in (IOS / "EdgemmDemo").glob("*.swift"):
        if f != SWIFT:
            assert not re.search(r"\bedgemm_\w+\s*\(", _code_only(f.read_text())), f


@pytest.fixture(scope="module")
def host_program(tmp_path_factory):
    lib = libedgemm()
    d = tmp_path_factory.mktemp("ios-host")
    exe = d / "edgemm_ios_host"
    run([compiler("c"), "-std=c99", "-O1", "-g", "-Wall", "-Wextra", "-pedantic", "-Werror", f"-I{HEADER_DIR}", HOST_C,
         "-o", exe, f"-L{lib.parent}", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"])
    return exe


@pytest.mark.parametrize("precision", ["fp32", "w8a8-int4"])
def test_host_program_answers_on_a_real_bundle(host_program, tmp_path, precision):
    """fp32: the answers are the torch reference's; w8a8-int4 (what the ios target's native file holds by default:
    W8A8 prefill, int4 decode): the token ids are the engine's through the Python binding."""
    bundle = native_bundle(precision)
    image, questions, truth = shapes_case()
    ppm = tmp_path / "image.ppm"
    Image.open(image).convert("RGB").save(ppm, format="PPM")  # the same RGB bytes Engine.rgb8 hands over
    r = subprocess.run([str(host_program), str(bundle), str(ppm), str(MAX_NEW), *questions],
                       capture_output=True, text=True, timeout=600)
    events = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert r.returncode == 0, f"host program failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    by = {}
    for e in events:
        by.setdefault(e["event"], []).append(e)
    assert by["version"][0]["abi"] == 1
    info = by["info"][0]["info"]
    assert info["image_size"] == 64 and info["num_visual_tokens"] == 64

    ref = native_reference(str(bundle), str(image), tuple(questions), MAX_NEW)
    expect = torch_answers(str(image), tuple(questions), MAX_NEW) if precision == "fp32" else [None] * len(questions)
    assert info["prefill_weights"] == ("f32" if precision == "fp32" else "w8a8"), info
    answers = by["answer"]
    assert [a["question"] for a in answers] == questions
    for a, rf, t in zip(answers, ref, expect):
        assert a["status"] == 0 and a["ids"] == rf["ids"] and a["ids"], (a, rf)
        assert t is None or a["text"].strip() == t, f"{a['question']!r}: C {a['text']!r} vs torch {t!r}"
        st = a["stats"]
        assert st["visual_tokens"] == 64 and st["prefill_tokens"] == rf["stats"]["prefill_tokens"] > 64
        assert st["ttft_ms"] > 0 and st["decode_tokens"] >= len(a["ids"])
        if precision != "fp32":  # the app's default (NPU lane on) runs the W8A8 prefill on the two-lane scheduler
            assert st["npu_lane_busy"] > 0, st
    assert answers[0]["stats"]["image_encode_ms"] > 0 and answers[1]["stats"]["image_encode_ms"] == 0
    assert answers[0]["text"].strip() == truth[0]  # the dataset's own question about this picture

    cancel = by["cancel"][0]
    assert cancel["status"] == 7 and len(cancel["ids"]) == 1  # EDGEMM_ERR_CANCELLED after the first token
    text_only = by["text_only"][0]
    assert text_only["status"] == 0 and text_only["stats"]["visual_tokens"] == 0 and text_only["stats"]["prefill_tokens"] < 64
    errors = by["error"]
    whats = [e["what"] for e in errors]
    assert whats == ["edgemm_generate", "edgemm_session_set_image_rgb8", "edgemm_model_load"], errors
    assert errors[0]["name"] == "EDGEMM_ERR_INVALID_ARGUMENT" and "empty" in errors[0]["message"]
    assert errors[1]["name"] == "EDGEMM_ERR_INVALID_ARGUMENT" and errors[1]["message"]
    assert errors[2]["name"] == "EDGEMM_ERR_IO" and "/nonexistent/edgemm-bundle" in errors[2]["message"]
    assert by["done"] == [{"event": "done", "ok": True}]
