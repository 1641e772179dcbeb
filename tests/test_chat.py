"""`edgemm chat` from a pipe and on a terminal (pty), and the `edgemm.load` Python API."""

import json
import os
import re
import select
import subprocess
import sys
import time

import pytest

import edgemm
from edgemm.errors import EdgemmError

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "NO_COLOR": "", "TERM": "xterm"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Two demo questions with their images: (path, question) pairs."""
    from edgemm.data import write_shapes

    root = write_shapes(tmp_path_factory.mktemp("shapes") / "ds", 6, 11)
    recs = [json.loads(x) for x in (root / "data.jsonl").read_text().splitlines()]
    return [(root / r["image"], r["question"]) for r in recs]


@pytest.fixture(scope="module")
def demo_answers(shapes):
    """What the torch session answers in-process (greedy, deterministic): the chat must print the same."""
    sess = edgemm.load("demo", threads=2)
    return [sess.generate(img, q, max_new_tokens=64) for img, q in shapes]


def _chat(args, lines, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgemm", "chat", *args], input="".join(x + "\n" for x in lines),
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def test_chat_from_a_pipe_answers_each_line_and_survives_errors(shapes, demo_answers, tmp_path):
    (img0, q0), (img1, q1), (_, q2) = shapes[:3]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    lines = [q0,
             f"/image {tmp_path / 'missing.png'}",  # error: the chat goes on with the old image
             q0,
             "/stats",
             f"/image {not_an_image}",  # error: not a readable image
             "/bogus",  # error: unknown command
             f"/image {img1}",
             q1,
             "/quit",
             q2]  # after /quit: never answered
    r = _chat(["demo", "--image", str(img0)], lines)
    out = r.stdout.splitlines()
    assert r.returncode == 1, r.stderr  # some lines failed -> non-zero, after answering everything else
    assert not ANSI.search(r.stdout + r.stderr), "no colours or cursor codes from a pipe"
    assert "you>" not in r.stdout + r.stderr
    assert out[0] == demo_answers[0]
    assert out[1] == demo_answers[0]  # the failed /image left the first image attached
    stats = dict(kv.split("=", 1) for kv in out[2].split())
    assert {"ttft_ms", "prefill_tokens", "prefill_tok_s", "decode_tok_s"} <= set(stats)
    assert float(stats["ttft_ms"]) > 0 and int(stats["prefill_tokens"]) > 64  # 64 visual tokens + the question
    assert out[3] == demo_answers[1]
    assert len(out) == 4, out  # nothing after /quit
    err = r.stderr
    assert f"error: image not found: {tmp_path / 'missing.png'}" in err
    assert "error: not a readable image" in err
    assert "error: unknown command /bogus" in err
    assert "3 of 9 input lines failed" in err
    assert "Traceback" not in err


def test_chat_json_lines_and_text_only(shapes, demo_answers):
    img0, q0 = shapes[0]
    r = _chat(["demo", "--json"], [q0, f"/image {img0}", q0, "/stats", "/image none", "/image", "   ", ""])
    assert r.returncode == 0, r.stderr
    objs = [json.loads(x) for x in r.stdout.splitlines()]
    assert [sorted(o) for o in objs] == [["answer", "image", "prompt", "timings"], ["image", "size"],
                                         ["answer", "image", "prompt", "timings"], ["answers", "load_s", "stats"],
                                         ["image"], ["image"]]
    text_only, attached, with_image, stats, detached, shown = objs
    assert text_only["image"] is None and text_only["timings"]["prefill_tokens"] < 64  # no visual tokens
    assert attached == {"image": str(img0), "size": [64, 64]}
    assert with_image["answer"] == demo_answers[0] and with_image["image"] == str(img0)
    assert stats["answers"] == 2 and stats["stats"] == with_image["timings"]
    assert detached == {"image": None} and shown == {"image": None}


def test_chat_startup_errors_are_one_line():
    r = _chat(["demo", "--image", "/no/such/image.png"], ["hi"])
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "error: image not found: /no/such/image.png"
    r = _chat(["demo", "--runtime", "nosuch"], ["hi"])
    assert r.returncode == 1 and "unknown runtime 'nosuch'" in r.stderr and "Traceback" not in r.stderr
    r = _chat(["demo", "--top-p", "0"], ["hi"])
    assert r.returncode == 1 and "top_p must be in (0, 1]" in r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pty driving is written for Linux")
def test_chat_on_a_terminal(shapes, demo_answers):
    """Drive the interactive mode through a pseudo-terminal: prompt, streamed answer, /stats table, /quit."""
    import pty

    img0, q0 = shapes[0]
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "edgemm", "chat", "demo"], stdin=slave, stdout=slave, stderr=slave,
                         env={**ENV, "COLUMNS": "120"}, close_fds=True)
    os.close(slave)
    buf = ""

    def expect(pattern, timeout=240):
        nonlocal buf
        end = time.time() + timeout
        while time.time() < end:
            m = re.search(pattern, ANSI.sub("", buf))
            if m:
                text = ANSI.sub("", buf)
                buf = text[m.end():]
                return text[:m.end()]
            r, _, _ = select.select([master], [], [], 1.0)
            if r:
                try:
                    buf += os.read(master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    break
        raise AssertionError(f"timed out waiting for {pattern!r}; got {ANSI.sub('', buf)[-2000:]!r}")

    def send(line):
        os.write(master, (line + "\r").encode())

    try:
        seen = expect(r"you> ")
        assert "edgemm chat" in seen and "runtime torch" in seen
        send(f"/image {img0}")
        expect(r"image: .*\(64x64\)")
        expect(r"you> ")
        send(q0)
        seen = expect(r"decode [0-9.]+ tok/s")
        assert demo_answers[0] in seen and "ttft" in seen
        expect(r"you> ")
        send("/stats")
        seen = expect(r"model loaded in .*\n.*you> ")
        assert "time to first token" in seen and "prefill speed" in seen and "1 answers so far" in seen
        send("/image /no/such.png")
        seen = expect(r"you> ")
        assert "error: image not found: /no/such.png" in seen
        send("/quit")
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)


def test_load_streams_what_generate_returns(tiny_ckpt, shapes):
    """edgemm.load(...).generate(stream=True) yields pieces that join to the non-streamed answer."""
    sess = edgemm.load(tiny_ckpt, threads=1)  # a random model: long answers, many pieces
    img, q = shapes[0]
    whole = sess.generate(img, q, max_new_tokens=12)
    pieces = list(sess.generate(str(img), q, stream=True, max_new_tokens=12))
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces).strip() == whole
    assert sess.stats["decode_tokens"] >= len(pieces) and sess.stats["ttft_ms"] > 0
    with edgemm.load(str(tiny_ckpt), runtime="torch", visual_tokens="pool:4") as small:
        small.generate(img, q, max_new_tokens=2)
        assert small.stats["prefill_tokens"] < sess.stats["prefill_tokens"]


def test_load_bad_input_is_an_edgemm_error(tmp_path):
    with pytest.raises(EdgemmError, match="unknown model"):
        edgemm.load(tmp_path / "nope")
    with pytest.raises(EdgemmError, match="threads"):
        edgemm.load("demo", threads=0)
    with pytest.raises(EdgemmError, match="unknown runtime"):
        edgemm.load("demo", runtime="nosuch")
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    with pytest.raises(EdgemmError, match="visual-token setting is fixed"):
        edgemm.load(bundle, visual_tokens="pool:4")


def test_chat_on_an_exported_bundle(shapes, demo_answers):
    """A bundle directory runs in its own runtime (here the C++ engine's fp32 model file: torch's answers)."""
    from apps_support import native_bundle

    bundle = native_bundle("fp32")
    img0, q0 = shapes[0]
    r = _chat([str(bundle), "--json", "--image", str(img0)], [q0, "/stats"])
    assert r.returncode == 0, r.stderr
    answer, stats = [json.loads(x) for x in r.stdout.splitlines()]
    assert answer["answer"] == demo_answers[0]
    assert stats["stats"]["prefill_tokens"] > 64 and stats["stats"]["ttft_ms"] > 0
    r = _chat([str(bundle), "--runtime", "onnxruntime"], [q0])
    assert r.returncode == 1 and "has no artifact for runtime 'onnxruntime'" in r.stderr


class _FailingSession:
    """Streams two pieces, then fails like a runtime whose context is full."""

    runtime = "fake"
    stats: dict = {}

    def generate(self, image, prompt, stream=False, **kw):
        def gen():
            yield " half"
            yield " an answer"
            if prompt == "fail":
                raise EdgemmError("native engine: generate: the context is full (512 tokens)")

        return gen()

    def close(self):
        pass


@pytest.mark.parametrize("as_json", [False, True])
def test_chat_reports_a_failure_in_mid_answer_and_goes_on(as_json):
    import io

    from edgemm.chat import Chat

    out, err = io.StringIO(), io.StringIO()
    chat = Chat(_FailingSession(), "fake", {}, out, err, interactive=False, as_json=as_json)
    assert chat.run_lines(["fail", "fine", "/quit"]) == 1
    if as_json:
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert lines[0] == {"error": "native engine: generate: the context is full (512 tokens)"}
        assert lines[1]["answer"] == "half an answer"
    else:
        assert out.getvalue() == "half an answer\nhalf an answer\n"  # the failed answer's line is ended
        assert "error: native engine: generate: the context is full (512 tokens)" in err.getvalue()
