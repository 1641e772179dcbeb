"""`edgemm bench`: runtime benchmarks with random weights and real models' shapes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import EdgemmError


def _csv(s: Optional[str]) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(runtime: str = typer.Option("torch,onnxruntime", "--runtime",
                                          help="comma-separated: torch, onnxruntime, executorch, llamacpp, native, or all"),
              preset: str = typer.Option("demo", "--preset", help="demo, smolvlm-256m or llava-qwen1.8b"),
              threads: int = typer.Option(2, "--threads", help="CPU threads of every runtime"),
              precision: Optional[str] = typer.Option(None, "--precision",
                                                      help="comma-separated precisions, or RUNTIME:PRECISION to pin one runtime's (default: "
                                                           "torch fp32,bf16; onnxruntime fp32,int8,int4; executorch 8da8w,8da4w; "
                                                           "llamacpp q8_0,q4_0; native w8a8-int4,int8)"),
              prompt_tokens: str = typer.Option("512,1024", "--prompt-tokens", help="text-only prefill lengths"),
              decode_tokens: int = typer.Option(32, "--decode-tokens", help="decode steps timed per repeat"),
              decode_context: int = typer.Option(64, "--decode-context", help="prompt length before the timed decode steps"),
              repeats: int = typer.Option(3, "--repeats", help="timed repeats per metric (the median is reported)"),
              token_compression: str = typer.Option("fastervlm:0.25", "--token-compression",
                                                    help="visual-token setting of the pruned TTFT ('none': skip it)"),
              ttft: bool = typer.Option(True, "--ttft/--no-ttft", help="time image+prompt questions"),
              text_layers: Optional[int] = typer.Option(None, "--text-layers",
                                                        help="run a reduced model with this many text layers (labelled; not scaled)"),
              cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="export cache (default $EDGEMM_CACHE/bench or ~/.cache/edgemm/bench)"),
              timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds per export/measure job"),
              out: Optional[Path] = typer.Option(None, "--out", help="also write the JSON report to this file (rewritten after each runtime/precision)"),
              chart: Optional[Path] = typer.Option(None, "--chart", help="write a PNG chart comparing the runtimes"),
              load: Optional[List[Path]] = typer.Option(None, "--load", help="render saved JSON reports (no measuring); repeatable"),
              as_markdown: bool = typer.Option(False, "--markdown", help="print markdown tables (as in docs/bench.md)"),
              as_json: bool = typer.Option(False, "--json", help="print the JSON report")):
        """Prefill/decode tokens/s, image encode and time-to-first-token, peak RSS and roofline fractions of a
        preset (random weights, real shapes) in each runtime, 2 threads by default (docs/bench.md)."""
        from rich.console import Console

        from .core import RUNTIMES, run_bench
        from .report import print_table, write_chart

        out_c, err_c = Console(), Console(stderr=True)
        if load:
            reports = []
            for f in load:
                try:
                    reports.append(json.loads(Path(f).read_text()))
                except (OSError, json.JSONDecodeError) as e:
                    raise EdgemmError(f"cannot read bench report {f}: {e}") from None
                if not isinstance(reports[-1], dict) or "results" not in reports[-1]:
                    raise EdgemmError(f"{f} is not an edgemm bench report")
        else:
            rts = list(RUNTIMES) if runtime.strip() == "all" else _csv(runtime)
            if not rts:
                raise EdgemmError("--runtime is empty")
            try:
                ns = [int(x) for x in _csv(prompt_tokens)]
            except ValueError:
                raise EdgemmError(f"--prompt-tokens takes comma-separated integers, got {prompt_tokens!r}") from None
            if not ns:
                raise EdgemmError("--prompt-tokens is empty")
            vt = None if token_compression.strip().lower() in ("", "none") else token_compression
            log = (lambda m: None) if as_json else (lambda m: err_c.print(m, highlight=False))
            def save(partial):
                if out is not None:
                    from ..fileio import write_json

                    write_json(out, partial)

            rep = run_bench(preset, rts, _csv(precision) or None, log=log, on_result=save, threads=threads, prompt_tokens=ns,
                            decode_tokens=decode_tokens, decode_context=decode_context, repeats=repeats,
                            token_compression=vt, cache_dir=cache_dir, ttft=ttft, text_layers=text_layers, timeout=timeout)
            reports = [rep]
            save(rep)
        if chart is not None:
            write_chart(reports, chart)
        if as_json:
            sys.stdout.write(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2) + "\n")
            return
        if as_markdown:
            from .report import markdown

            for rep in reports:
                sys.stdout.write(f"**{rep['preset']}** ({rep['threads']} threads, median of {rep['settings']['repeats']}, "
                                 f"started {rep.get('started_utc', '?')}, load average {rep['machine']['loadavg']}):\n\n")
                sys.stdout.write(markdown(rep) + "\n")
            return
        for rep in reports:
            print_table(rep, out_c)
        if chart is not None:
            out_c.print(f"chart: {chart}")
