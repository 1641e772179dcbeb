"""`edgemm chat MODEL_OR_BUNDLE`: a terminal chat about an image, in any runtime.

On a terminal: a prompt, answers streamed as tokens arrive, commands /image PATH, /stats, /help, /quit
(Ctrl-C stops an answer, Ctrl-D leaves). From a pipe (stdin not a terminal): every input line is a question
or a command, each answer is one line on stdout, no prompts, no colours; notices and errors go to stderr
(with --json: one JSON object per line on stdout for everything). Errors in a line (a missing image, an
empty prompt, a full context) are reported and the chat goes on; from a pipe the exit status is 1 when
some line failed.

The demo models are single-turn: each question is answered on its own, about the attached image.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

import typer

from .errors import EdgemmError

COMMANDS = {
    "/image PATH": "attach an image for the next questions (/image none: text only; /image: show the current one)",
    "/stats": "timings of the last answer (time to first token, prefill and decode speed)",
    "/help": "this list",
    "/quit": "leave (also /exit, or Ctrl-D)",
}

STAT_ROWS = (  # key in Session.stats, label, unit
    ("ttft_ms", "time to first token", "ms"),
    ("image_encode_ms", "image encode", "ms"),
    ("prefill_ms", "prefill", "ms"),
    ("prefill_tokens", "prefill tokens", ""),
    ("prefill_tok_s", "prefill speed", "tok/s"),
    ("decode_ms", "decode", "ms"),
    ("decode_tokens", "decode tokens", ""),
    ("decode_tok_s", "decode speed", "tok/s"),
)


@dataclass
class ChatState:
    image: object = None  # PIL image or None
    image_path: Optional[str] = None
    answers: int = 0
    errors: int = 0
    last_stats: dict = field(default_factory=dict)


class Chat:
    """The chat loop over a Session; `handle(line)` processes one input line (False = leave)."""

    def __init__(self, session, model: str, gen_options: dict, out: TextIO, err: TextIO,
                 interactive: bool, as_json: bool, load_s: float = 0.0):
        from rich.console import Console

        self.session = session
        self.model = model
        self.gen_options = gen_options
        self.interactive = interactive
        self.as_json = as_json
        self.load_s = load_s
        self.state = ChatState()
        self.out_raw = out
        self.err_raw = err
        # Colours only on a terminal; from a pipe rich writes plain text.
        self.out = Console(file=out, force_terminal=interactive or None, no_color=not interactive,
                           highlight=False, soft_wrap=True)
        self.err = Console(file=err, force_terminal=interactive or None, no_color=not interactive,
                           highlight=False, soft_wrap=True)

    # -------------------------------------------------------------------------------------- output

    def _json(self, obj: dict) -> None:
        self.out_raw.write(json.dumps(obj) + "\n")
        self.out_raw.flush()

    def notice(self, text: str) -> None:
        if self.as_json:
            return
        if self.interactive:
            self.out.print(f"[dim]{_esc(text)}[/dim]")
        else:
            self.err.print(text, markup=False)

    def error(self, text: str) -> None:
        self.state.errors += 1
        if self.as_json:
            self._json({"error": text})
        elif self.interactive:
            self.out.print(f"[red]error:[/red] {_esc(text)}")
        else:
            self.err.print(f"error: {text}", markup=False)
            self.err.file.flush()

    # ------------------------------------------------------------------------------------ commands

    def set_image(self, arg: str) -> None:
        from .processor import load_image

        if not arg:
            cur = self.state.image_path
            if self.as_json:
                self._json({"image": cur})
            else:
                self._say(f"image: {cur}" if cur else "no image attached (text only); /image PATH attaches one")
            return
        if arg.lower() in ("none", "off", "-"):
            self.state.image, self.state.image_path = None, None
            if self.as_json:
                self._json({"image": None})
            else:
                self.notice("image detached: questions are text only")
            return
        path = _unquote(arg)
        img = load_image(Path(path).expanduser())  # EdgemmError: one line, the chat goes on
        self.state.image, self.state.image_path = img, path
        if self.as_json:
            self._json({"image": path, "size": list(img.size)})
        else:
            self.notice(f"image: {path} ({img.size[0]}x{img.size[1]})")

    def _say(self, text: str) -> None:
        """Requested output (help, stats, show image): stdout, plain from a pipe."""
        if self.interactive:
            self.out.print(text, markup=False)
        else:
            self.out_raw.write(text + "\n")
            self.out_raw.flush()

    def show_stats(self) -> None:
        st = dict(self.state.last_stats)
        if self.as_json:
            self._json({"stats": st, "answers": self.state.answers, "load_s": round(self.load_s, 3)})
            return
        if not st:
            self._say("no answer yet: ask a question first")
            return
        rows = [(label, _fmt(st[key]), unit) for key, label, unit in STAT_ROWS if key in st]
        rows += [(k, _fmt(v), "") for k, v in st.items() if k not in {r[0] for r in STAT_ROWS}]
        if self.interactive:
            from rich.table import Table

            t = Table(title=f"last answer ({self.session.runtime})", show_header=False)
            t.add_column("what")
            t.add_column("value", justify="right")
            t.add_column("unit")
            for r in rows:
                t.add_row(*r)
            self.out.print(t)
            self.out.print(f"[dim]{self.state.answers} answers so far; model loaded in {self.load_s:.2f} s[/dim]")
        else:
            keys = [k for k, _, _ in STAT_ROWS if k in st] + [k for k in st if k not in {r[0] for r in STAT_ROWS}]
            self._say(" ".join(f"{k}={_fmt(st[k])}" for k in keys))

    def show_help(self) -> None:
        if self.as_json:
            self._json({"help": COMMANDS})
            return
        width = max(len(k) for k in COMMANDS)
        lines = ["type a question about the attached image, or a command:"]
        lines += [f"  {k.ljust(width)}  {v}" for k, v in COMMANDS.items()]
        self._say("\n".join(lines))

    # -------------------------------------------------------------------------------------- answer

    def answer(self, question: str) -> None:
        pieces: list[str] = []
        interrupted = False
        stream = self.session.generate(self.state.image, question, stream=True, **self.gen_options)
        started = False
        try:
            for piece in stream:
                if not started:  # the answer starts with a space after "ASSISTANT:"
                    piece = piece.lstrip()
                    if not piece:
                        continue
                    started = True
                pieces.append(piece)
                if self.as_json:
                    continue
                if self.interactive:
                    self.out.print(piece, end="", style="cyan", markup=False)
                    self.out.file.flush()
                else:
                    self.out_raw.write(piece)
                    self.out_raw.flush()
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            interrupted = True
        except BaseException:
            if pieces and not self.as_json:  # end the half-written answer's line before the error
                (self.out.file if self.interactive else self.out_raw).write("\n")
            raise
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # a generator stopped early releases the runtime (the native one cancels)
        text = "".join(pieces).strip()
        self.state.answers += 1
        self.state.last_stats = dict(getattr(self.session, "stats", {}) or {})
        if self.as_json:
            self._json({"prompt": question, "image": self.state.image_path, "answer": text,
                        "timings": self.state.last_stats})
            return
        if self.interactive:
            if interrupted:
                self.out.print(" [yellow][stopped][/yellow]", end="")
            self.out.print()
            st = self.state.last_stats
            if st.get("ttft_ms") is not None and not interrupted:
                self.out.print(f"[dim]ttft {_fmt(st.get('ttft_ms'))} ms · prefill {_fmt(st.get('prefill_tok_s'))} tok/s"
                               f" · decode {_fmt(st.get('decode_tok_s'))} tok/s[/dim]")
        else:
            self.out_raw.write("\n")
            self.out_raw.flush()

    # ---------------------------------------------------------------------------------------- loop

    def handle(self, line: str) -> bool:
        """Process one input line; False when the chat should end."""
        line = line.strip()
        if not line:
            return True
        debug = os.environ.get("EDGEMM_DEBUG") == "1"
        try:
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                cmd, arg = cmd.lower(), arg.strip()
                if cmd in ("/quit", "/exit", "/q"):
                    return False
                if cmd == "/image":
                    self.set_image(arg)
                elif cmd == "/stats":
                    self.show_stats()
                elif cmd in ("/help", "/?"):
                    self.show_help()
                else:
                    raise EdgemmError(f"unknown command {cmd}; /help lists the commands")
                return True
            self.answer(line)
        except EdgemmError as e:
            self.error(str(e))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a runtime failure in one answer does not end the chat
            if debug:
                raise
            self.error(f"{type(e).__name__}: {e} (set EDGEMM_DEBUG=1 for a traceback)")
        return True

    def banner(self) -> None:
        rt = getattr(self.session, "runtime", "?")
        self.out.print(f"[bold]edgemm chat[/bold] · {_esc(self.model)} · runtime [bold]{_esc(rt)}[/bold] "
                       f"· loaded in {self.load_s:.1f} s")
        img = self.state.image_path
        self.out.print(f"[dim]image: {_esc(img) if img else 'none (/image PATH attaches one)'} · "
                       f"each question is answered on its own · /help for commands, /quit to leave[/dim]")

    def run_interactive(self) -> int:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - Windows
            pass
        self.banner()
        while True:
            try:
                line = self.out.input("[bold green]you>[/bold green] ")
            except EOFError:
                self.out.print()
                return 0
            except KeyboardInterrupt:
                self.out.print("\n[dim](/quit or Ctrl-D leaves)[/dim]")
                continue
            if not self.handle(line):
                return 0

    def run_lines(self, lines) -> int:
        n = 0
        for line in lines:
            n += 1
            if not self.handle(line):
                break
        if self.state.errors and not self.as_json:
            self.err.print(f"{self.state.errors} of {n} input lines failed", markup=False)
        return 1 if self.state.errors else 0


def _esc(text) -> str:
    from rich.markup import escape

    return escape(str(text))


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def run_chat(model: str, image: Optional[Path] = None, runtime: Optional[str] = None, threads: Optional[int] = None,
             visual_tokens: Optional[str] = None, gen_options: Optional[dict] = None, as_json: bool = False,
             stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
             interactive: Optional[bool] = None) -> int:
    """Load the model, then chat on stdin/stdout; returns the exit status."""
    from .api import load
    from .processor import load_image
    from .runtimes.base import GenerateOptions

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if interactive is None:
        interactive = stdin.isatty() and stdout.isatty() and not as_json
    opts = dict(gen_options or {})
    GenerateOptions(**opts).validate()  # bad options fail before the model loads
    first = load_image(image) if image is not None else None  # so does a bad --image
    t0 = time.perf_counter()
    if interactive:
        from rich.console import Console

        with Console(file=stderr).status(f"loading {model} ..."):
            sess = load(model, runtime=runtime, threads=threads, visual_tokens=visual_tokens)
    else:
        sess = load(model, runtime=runtime, threads=threads, visual_tokens=visual_tokens)
    chat = Chat(sess, model, opts, stdout, stderr, interactive=interactive, as_json=as_json,
                load_s=time.perf_counter() - t0)
    if first is not None:
        chat.state.image, chat.state.image_path = first, str(image)
    try:
        return chat.run_interactive() if interactive else chat.run_lines(stdin)
    finally:
        sess.close()


def register(app: typer.Typer) -> None:
    @app.command()
    def chat(model: str = typer.Argument(..., help="demo, demo-small, an edgemm checkpoint directory, or an exported bundle"),
             image: Optional[Path] = typer.Option(None, "--image", help="PNG/JPEG image to start with (/image PATH changes it)"),
             runtime: Optional[str] = typer.Option(None, help="torch (models) or onnxruntime, executorch, llamacpp, native (bundles); default: torch for a model, the bundle's own runtime for a bundle"),
             threads: Optional[int] = typer.Option(None, help="CPU threads (default 2)"),
             max_new_tokens: int = typer.Option(64, help="longest answer in tokens"),
             temperature: float = typer.Option(0.0, help="0 = greedy"),
             top_k: int = typer.Option(0, help="sample among the k most likely tokens (0 = off)"),
             top_p: float = typer.Option(1.0, help="nucleus sampling mass (1 = off)"),
             seed: Optional[int] = typer.Option(None, help="sampling seed"),
             visual_tokens: Optional[str] = typer.Option(None, "--visual-tokens", help="visual-token compression METHOD:KEEP on top of a model (torch), e.g. fastervlm:0.25"),
             as_json: bool = typer.Option(False, "--json", help="one JSON object per line: answers with timings, stats, errors")):
        """Chat about an image in the terminal (streams answers; /image PATH, /stats, /help, /quit). Works from a pipe."""
        if threads is not None and threads < 1:
            raise EdgemmError("--threads must be >= 1")
        opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        code = run_chat(model, image=image, runtime=runtime, threads=threads or min(2, os.cpu_count() or 1),
                        visual_tokens=visual_tokens, gen_options=opts, as_json=as_json)
        if code:
            raise SystemExit(code)  # (typer.Exit's code is dropped when the CLI runs with standalone_mode=False)
