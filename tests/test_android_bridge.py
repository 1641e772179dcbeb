"""The Android demo's JNI bridge, on the host: compiled against the host JDK's jni.h and the engine library,
driven by a Java harness that declares exactly the app's native methods, on a real bundle of the demo model.
And: the Kotlin `external fun`s, the Java harness's `native` methods and the C++ JNI symbols are the same set.

Needs javac/java (CI: default-jdk-headless) and a C++ compiler; a missing one fails, it does not skip.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from apps_support import REPO, HEADER_DIR, compiler, libedgemm, native_bundle, native_reference, run, shapes_case, torch_answers

APP = REPO / "android_demo"
KT = APP / "app/src/main/java/dev/edgemm/demo/EdgemmNative.kt"
CPP = APP / "app/src/main/cpp/edgemm_jni.cpp"
HARNESS = APP / "host_test/java/dev/edgemm/demo"
JAVA = HARNESS / "EdgemmNative.java"
MAX_NEW = 16
JNI_PREFIX = "Java_dev_edgemm_demo_EdgemmNative_"

# --------------------------------------------------------------------------- declarations (no engine)

KOTLIN_TYPES = {"Int": "I", "Long": "J", "Boolean": "Z", "Float": "F", "Double": "D", "Unit": "V",
                "String": "Ljava/lang/String;", "IntArray": "[I", "DoubleArray": "[D", "ByteArray": "[B",
                "FloatArray": "[F", "TokenListener": "Ldev/edgemm/demo/TokenListener;"}
JAVA_TYPES = {"int": "I", "long": "J", "boolean": "Z", "float": "F", "double": "D", "void": "V",
              "String": "Ljava/lang/String;", "int[]": "[I", "double[]": "[D", "byte[]": "[B", "float[]": "[F",
              "TokenListener": "Ldev/edgemm/demo/TokenListener;"}
JNI_TYPES = {"jint": "I", "jlong": "J", "jboolean": "Z", "jfloat": "F", "jdouble": "D", "void": "V",
             "jstring": "Ljava/lang/String;", "jintArray": "[I", "jdoubleArray": "[D", "jbyteArray": "[B",
             "jfloatArray": "[F", "jobject": "L*;"}  # jobject: any class other than String / arrays


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def kotlin_decls(path=KT) -> dict:
    src = _strip_comments(path.read_text())
    out = {}
    for m in re.finditer(r"(@JvmStatic\s+)?external\s+fun\s+(\w+)\s*\(([^)]*)\)\s*(?::\s*([\w.]+))?", src, re.S):
        static, name, params, ret = m.groups()
        assert static, f"{name}: the bridge takes jclass, so the Kotlin external fun must be @JvmStatic"
        types = [p.split(":", 1)[1].strip() for p in params.split(",") if p.strip()]
        out[name] = (tuple(KOTLIN_TYPES[t] for t in types), KOTLIN_TYPES[ret or "Unit"])
    return out


def java_decls(path=JAVA) -> dict:
    src = _strip_comments(path.read_text())
    out = {}
    for m in re.finditer(r"((?:public|private|static|\s)*)\bnative\s+([\w\[\]]+)\s+(\w+)\s*\(([^)]*)\)", src):
        mods, ret, name, params = m.groups()
        assert "static" in mods, f"{name}: the harness's native methods must be static like the Kotlin @JvmStatic ones"
        types = [" ".join(p.split()[:-1]) for p in params.split(",") if p.strip()]
        out[name] = (tuple(JAVA_TYPES[t] for t in types), JAVA_TYPES[ret])
    return out


def jni_decls(path=CPP) -> dict:
    src = _strip_comments(path.read_text())
    out = {}
    for m in re.finditer(r"JNIEXPORT\s+(\w+)\s+JNICALL\s+(\w+)\s*\(([^)]*)\)", src, re.S):
        ret, sym, params = m.groups()
        assert sym.startswith(JNI_PREFIX), f"{sym}: every JNI entry point belongs to dev.edgemm.demo.EdgemmNative"
        name = sym[len(JNI_PREFIX):]
        assert "_" not in name, f"{sym}: JNI would mangle '_' (write _1); keep method names camelCase"
        ps = [p.strip() for p in params.split(",")]
        assert ps[0].startswith("JNIEnv*") and ps[1].split()[0] == "jclass", f"{sym}: (JNIEnv*, jclass, ...) expected"
        types = [p.split()[0] for p in ps[2:]]
        out[name] = (tuple(JNI_TYPES[t] for t in types), JNI_TYPES[ret])
    return out


def _same(jni_sig, sig) -> bool:
    (jp, jr), (p, r) = jni_sig, sig
    one = lambda a, b: a == b or (a == "L*;" and b.startswith("L") and b != "Ljava/lang/String;")
    return len(jp) == len(p) and all(one(a, b) for a, b in zip(jp, p)) and one(jr, r)


def test_kotlin_java_and_jni_declare_the_same_native_methods():
    kt, java, jni = kotlin_decls(), java_decls(), jni_decls()
    assert len(kt) >= 10, kt  # the parser found the real list
    assert set(kt) == set(java) == set(jni), (sorted(kt), sorted(java), sorted(jni))
    for name in kt:
        assert kt[name] == java[name], f"{name}: Kotlin {kt[name]} vs Java harness {java[name]}"
        assert _same(jni[name], kt[name]), f"{name}: JNI {jni[name]} vs Kotlin {kt[name]}"


def test_the_declaration_check_catches_a_mismatch(tmp_path):
    """The parsers see a changed parameter type, a missing method and a misnamed symbol."""
    bad_kt = tmp_path / "k.kt"
    bad_kt.write_text(KT.read_text().replace("fun clearImage(session: Long)", "fun clearImage(session: Int)"))
    assert kotlin_decls(bad_kt)["clearImage"] != java_decls()["clearImage"]
    bad_java = tmp_path / "j.java"
    bad_java.write_text(re.sub(r"public static native void freeModel\(long model\);", "", JAVA.read_text()))
    assert "freeModel" not in java_decls(bad_java) and "freeModel" in kotlin_decls()
    bad_cpp = tmp_path / "b.cpp"
    bad_cpp.write_text(CPP.read_text().replace(JNI_PREFIX + "version", "Java_dev_edgemm_demo_Other_version"))
    with pytest.raises(AssertionError, match="belongs to dev.edgemm.demo.EdgemmNative"):
        jni_decls(bad_cpp)


def test_callback_exception_and_stat_contracts_match():
    """What the C++ looks up by name (onToken, EdgemmException(int, String), the stats order) exists in Kotlin,
    in the Java harness and in the R8 keep rules."""
    kt_all = "\n".join(p.read_text() for p in (APP / "app/src/main/java/dev/edgemm/demo").glob("*.kt"))
    cpp = CPP.read_text()
    assert '"onToken", "(Ljava/lang/String;I)Z"' in cpp
    assert re.search(r"interface TokenListener\s*\{\s*fun onToken\(piece: String, tokenId: Int\): Boolean", kt_all)
    assert re.search(r"boolean onToken\(String piece, int tokenId\)", (HARNESS / "TokenListener.java").read_text())
    assert '"dev/edgemm/demo/EdgemmException"' in cpp and '"(ILjava/lang/String;)V"' in cpp
    assert re.search(r"class EdgemmException\(val status: Int, message: String\)", kt_all)
    assert re.search(r"public EdgemmException\(int status, String message\)", (HARNESS / "EdgemmException.java").read_text())
    rules = (APP / "app/proguard-rules.pro").read_text()
    for keep in ("dev.edgemm.demo.EdgemmNative", "native <methods>", "<init>(int, java.lang.String)",
                 "boolean onToken(java.lang.String, int)"):
        assert keep in rules
    # STAT_* indices: Kotlin == Java == the C++ enum order (kImageEncodeMs <-> STAT_IMAGE_ENCODE_MS).
    kt_stats = {k: int(v) for k, v in re.findall(r"const val (STAT_\w+) = (\d+)", KT.read_text())}
    java_stats = {k: int(v) for k, v in re.findall(r"(STAT_\w+) = (\d+);", JAVA.read_text())}
    enum = re.search(r"enum StatIndex \{(.*?)\};", cpp, re.S).group(1)
    names = [n.split("=")[0].strip() for n in enum.split(",") if n.strip()]
    cpp_stats = {"STAT_" + re.sub(r"(?<!^)(?=[A-Z])", "_", n[1:]).upper(): i for i, n in enumerate(names) if n != "kStatCount"}
    assert kt_stats == java_stats == cpp_stats and len(kt_stats) == 10, (kt_stats, java_stats, cpp_stats)


def test_gradle_project_wires_native_and_the_bridge():
    gradle = (APP / "app/build.gradle.kts").read_text()
    assert 'path = file("src/main/cpp/CMakeLists.txt")' in gradle
    cm = (APP / "app/src/main/cpp/CMakeLists.txt").read_text()
    root = re.search(r"set\(EDGEMM_ROOT \$\{CMAKE_CURRENT_SOURCE_DIR\}/([^)]+)\)", cm).group(1)
    assert (APP / "app/src/main/cpp" / root / "CMakeLists.txt").resolve() == REPO / "native" / "CMakeLists.txt"
    assert "add_library(edgemm_jni SHARED edgemm_jni.cpp)" in cm and "edgemm_shared" in cm
    native_cm = (REPO / "native/CMakeLists.txt").read_text()
    assert re.search(r"add_library\(\s*edgemm_shared\s+SHARED", native_cm), "native/ defines no edgemm_shared target"
    assert 'System.loadLibrary("edgemm_jni")' in KT.read_text()


# ------------------------------------------------------------------------------ the bridge, running


def _jdk() -> Path:
    javac = shutil.which("javac")
    assert javac and shutil.which("java"), "no JDK on PATH: install one (Debian/Ubuntu: apt-get install default-jdk-headless)"
    home = Path(os.environ.get("JAVA_HOME") or Path(os.path.realpath(javac)).parent.parent)
    assert (home / "include" / "jni.h").is_file(), f"no jni.h under {home}/include (set JAVA_HOME to a full JDK)"
    return home


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """Build libedgemm_jni.so from the app's edgemm_jni.cpp and the Java harness; -> (classes, lib dirs)."""
    home = _jdk()
    lib = libedgemm()
    d = tmp_path_factory.mktemp("jni")
    plat = "darwin" if (home / "include" / "darwin").is_dir() else "linux"
    so = d / ("libedgemm_jni.dylib" if plat == "darwin" else "libedgemm_jni.so")
    run([compiler("c++"), "-std=c++17", "-O1", "-g", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
         f"-I{home}/include", f"-I{home}/include/{plat}", f"-I{HEADER_DIR}", CPP, "-o", so,
         f"-L{lib.parent}", f"-l:{lib.name}" if plat == "linux" else "-ledgemm", f"-Wl,-rpath,{lib.parent}"])
    # System.loadLibrary("edgemm") wants libedgemm.so in java.library.path, as on Android.
    libdir = d / "libs"
    libdir.mkdir()
    (libdir / lib.name).symlink_to(lib)
    classes = d / "classes"
    run(["javac", "-Xlint:all", "-Werror", "-d", classes, *sorted(HARNESS.glob("*.java"))])
    return classes, f"{d}{os.pathsep}{libdir}"


def _run_harness(harness, bundle, image, questions):
    classes, libpath = harness
    r = subprocess.run(["java", f"-Djava.library.path={libpath}", "-Xcheck:jni", "-cp", str(classes),
                        "dev.edgemm.demo.HostHarness", str(bundle), str(image), str(MAX_NEW), *questions],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, f"harness failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    events = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return events, r.stderr


def test_jni_bridge_answers_on_a_real_bundle(harness):
    bundle = native_bundle("fp32")
    image, questions, truth = shapes_case()
    events, stderr = _run_harness(harness, bundle, image, questions)
    by = {}
    for e in events:
        by.setdefault(e["event"], []).append(e)
    assert by["version"][0]["abi"] == 1 and by["version"][0]["version"]
    info = by["info"][0]["info"]
    assert info["image_size"] == 64 and info["num_visual_tokens"] == 64 and info["vocab_size"] == 374

    # 1. The answers: the same token ids as the engine through the Python binding, and the torch reference's text.
    ref = native_reference(str(bundle), str(image), tuple(questions), MAX_NEW)
    expect = torch_answers(str(image), tuple(questions), MAX_NEW)
    answers = by["answer"]
    assert [a["question"] for a in answers] == questions
    for a, r, t in zip(answers, ref, expect):
        assert a["ids"] == r["ids"] and len(a["ids"]) >= 1, (a, r)  # EOS is never reported
        assert a["answer"] == t, f"{a['question']!r}: JNI {a['answer']!r} vs torch {t!r}"
        assert "".join(a["pieces"]).strip() == a["answer"]
        st = a["stats"]
        assert st["visual_tokens"] == 64 and st["prefill_tokens"] > 64 and st["cancelled"] == 0
        assert st["ttft_ms"] > 0 and st["prefill_ms"] > 0 and st["decode_tokens"] >= len(a["ids"])
        assert st["prefill_tokens"] == r["stats"]["prefill_tokens"]
    # The image is encoded once and reused by later questions (set once, asked three times).
    assert answers[0]["stats"]["image_encode_ms"] > 0 and answers[1]["stats"]["image_encode_ms"] == 0
    assert answers[0]["answer"] == truth[0]  # the demo model answers the dataset's question about this picture

    # 2. Stopping from the listener is a cancel, not an error; a throwing listener's exception reaches Java.
    cancel = by["cancel"][0]
    assert len(cancel["pieces"]) == 1 and cancel["stats"]["cancelled"] == 1
    assert by["listener_throws"][0]["caught"] == "listener failed on purpose"
    s = by["sampling"][0]
    assert s["first"] == s["second"] and s["first"].strip()
    # 3. Non-ASCII prompt and text-only: answered.
    assert by["unicode"][0]["stats"]["prefill_tokens"] > 64
    assert by["text_only"][0]["stats"]["visual_tokens"] == 0 and by["text_only"][0]["stats"]["prefill_tokens"] < 64
    # 4. Bad input -> a Java exception with a message, never a crash.
    errs = {e["name"]: e for e in by["error_case"]}
    assert errs["short_pixels"]["thrown"] == "java.lang.IllegalArgumentException"
    assert errs["zero_size"]["thrown"] == "java.lang.IllegalArgumentException"
    assert errs["null_handle"]["thrown"] == "java.lang.IllegalStateException"
    assert errs["null_prompt"]["thrown"] == "java.lang.NullPointerException"
    for name in ("empty_prompt", "bad_top_p", "missing_model"):
        e = errs[name]
        assert e["thrown"] == "dev.edgemm.demo.EdgemmException" and e["status"] in (1, 2, 3), e
        assert len(e["message"]) > 10 and "\n" not in e["message"], e
    assert errs["missing_model"]["status"] == 2 and "does-not-exist" in errs["missing_model"]["message"]
    assert by["done"], "the harness did not reach the end"
    assert "WARNING" not in stderr, stderr  # -Xcheck:jni complaints (local refs, pending exceptions)


@pytest.mark.skipif(shutil.which("kotlinc") is None,
                    reason="kotlinc not installed (Debian: apt-get install kotlin); the Java twin above ran instead")
def test_the_kotlin_class_itself_binds_to_the_bridge(harness, tmp_path):
    """Where a Kotlin compiler exists: compile the app's EdgemmNative.kt unchanged and run the harness against
    it instead of the Java twin (the JNI symbols must bind to what kotlinc emits)."""
    classes, libpath = harness
    jar = tmp_path / "kt.jar"
    run(["kotlinc", KT, "-include-runtime", "-d", jar], timeout=600)
    hh = tmp_path / "harness"
    run(["javac", "-cp", jar, "-d", hh, HARNESS / "HostHarness.java"])
    image, questions, _ = shapes_case()
    r = subprocess.run(["java", f"-Djava.library.path={libpath}", "-Xcheck:jni", "-cp", f"{hh}{os.pathsep}{jar}",
                        "dev.edgemm.demo.HostHarness", str(native_bundle("fp32")), str(image), str(MAX_NEW), questions[0]],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    events = {e["event"]: e for e in map(json.loads, r.stdout.splitlines())}
    ref = native_reference(str(native_bundle("fp32")), str(image), tuple(questions), MAX_NEW)
    assert events["answer"]["ids"] == ref[0]["ids"] and events["done"]
    assert events["cancel"]["stats"]["cancelled"] == 1
