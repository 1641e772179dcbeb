"""The bench report as a rich table, markdown rows (docs/bench.md) and a PNG chart (matplotlib)."""

from __future__ import annotations

from pathlib import Path


def _f(x, nd=1, pct=False):
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:,.{nd}f}"


def rows(report: dict) -> list[dict]:
    """One flat row per result (what the table, the markdown and the chart show)."""
    out = []
    n1, n2 = (report["settings"]["prompt_tokens"] + [None, None])[:2]
    for r in report["results"]:
        label = f"{r['runtime']} {r['precision']}"
        if r.get("status") != "ok":
            out.append({"label": label, "status": r.get("status"), "reason": r.get("reason", "")})
            continue
        p = r.get("prefill_tok_s") or {}
        t = r.get("ttft_ms") or {}
        fr = r.get("int8_peak_fraction") or {}
        out.append({
            "label": label + (" *" if r.get("scaled_from_layers") else "") + (f" ({r['text_layers']}L)" if r.get("text_layers") else ""),
            "status": "ok",
            "prefill_1": p.get(str(n1)) if n1 else None, "prefill_2": p.get(str(n2)) if n2 else None,
            "decode": r.get("decode_tok_s"), "image_ms": r.get("image_encode_ms"),
            "ttft_full": t.get("full"), "ttft_pruned": t.get("pruned"), "speedup": r.get("ttft_pruned_speedup"),
            "rss": r.get("peak_rss_mb"), "rss_est": r.get("peak_rss_estimated", False),
            "int8_frac": fr.get(str(n1)) if n1 else None, "bw_frac": r.get("bandwidth_fraction"),
            "cpu": min(r["cpu_utilization"]) if isinstance(r.get("cpu_utilization"), list) else r.get("cpu_utilization"),
        })
    return out


HEAD = ["runtime", "prefill@{n1} tok/s", "prefill@{n2} tok/s", "decode tok/s", "image ms", "TTFT ms", "TTFT pruned ms",
        "speedup", "peak RSS MB", "int8 peak", "bandwidth", "CPU util"]


def _cells(x: dict) -> list[str]:
    if x["status"] != "ok":
        return [x["label"], f"{x['status']}: {x['reason']}"] + [""] * (len(HEAD) - 2)
    return [x["label"], _f(x["prefill_1"]), _f(x["prefill_2"]), _f(x["decode"]), _f(x["image_ms"]), _f(x["ttft_full"]),
            _f(x["ttft_pruned"]), (_f(x["speedup"], 2) + "x") if x["speedup"] else "-",
            ("~" if x["rss_est"] else "") + _f(x["rss"], 0), _f(x["int8_frac"], pct=True), _f(x["bw_frac"], pct=True),
            _f(x.get("cpu"), 2)]


def _head(report: dict) -> list[str]:
    n1, n2 = (report["settings"]["prompt_tokens"] + ["-", "-"])[:2]
    return [h.format(n1=n1, n2=n2) for h in HEAD]


def print_table(report: dict, console) -> None:
    from rich.table import Table

    s = report["settings"]
    t = Table(title=f"edgemm bench {report['preset']} ({report['threads']} threads, median of {s['repeats']}; "
                    f"pruned = {s['token_compression']})")
    for i, h in enumerate(_head(report)):
        t.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
    for x in rows(report):
        t.add_row(*_cells(x))
    console.print(t)
    for note in _notes(report):
        console.print(f"note: {note}")
    console.print(f"shapes: {report['shapes']['text']}; {report['shapes']['vision']}")
    console.print(f"load average at the start: {report['machine']['loadavg']} ({report['machine']['cpus']} CPUs)")


def _notes(report: dict) -> list[str]:
    out = []
    for r in report["results"]:
        if r.get("note"):
            out.append(f"{r['runtime']} {r['precision']}: {r['note']}")
        for k, why in (r.get("unscaled") or {}).items():
            out.append(f"{r['runtime']} {r['precision']}: {k} not extrapolated ({why})")
    return out


def markdown(report: dict) -> str:
    head = _head(report)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for x in rows(report):
        lines.append("| " + " | ".join(_cells(x)) + " |")
    notes = [f"- {n}" for n in _notes(report)]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def write_chart(reports: list[dict] | dict, path: str | Path) -> Path:
    """Bars of prefill tok/s (first prompt length) and decode tok/s per runtime, one row per preset."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgemm.fileio import atomic_file

    reports = [reports] if isinstance(reports, dict) else list(reports)
    fig, axes = plt.subplots(len(reports), 2, figsize=(12, 3.6 * len(reports)), squeeze=False)
    for row, rep in zip(axes, reports):
        ok = [x for x in rows(rep) if x["status"] == "ok"]
        labels = [x["label"] for x in ok]
        n1 = rep["settings"]["prompt_tokens"][0]
        for ax, key, title in ((row[0], "prefill_1", f"prefill, {n1}-token prompt (tok/s)"), (row[1], "decode", "decode (tok/s)")):
            vals = [x[key] or 0 for x in ok]
            bars = ax.barh(labels, vals, color=["#4c72b0" if "native" not in lb else "#dd8452" for lb in labels])
            ax.bar_label(bars, labels=[f"{v:,.1f}" for v in vals], fontsize=7, padding=2)
            ax.set_title(f"{rep['preset']}: {title}", fontsize=9)
            ax.invert_yaxis()
            ax.tick_params(labelsize=7)
            ax.set_xlim(0, max(vals + [1]) * 1.2)
    fig.text(0.01, 0.005, "2 threads, random weights, median of repeats; * = layer-scaled (see docs/bench.md)", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    with atomic_file(path) as f:
        f.write(buf.getvalue())
    return path
