"""The recipe report: report.json, report.md (a markdown table) and report.png (accuracy against
weight bytes and against estimated prefill FLOPs), rewritten after every stage."""

from __future__ import annotations

import io
from pathlib import Path

from ..fileio import atomic_file, write_json


def _mb(b: int) -> str:
    return f"{b / 1e6:.2f}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def markdown(rep: dict) -> str:
    rows = rep["rows"]
    ev = rep["eval"]
    base = rows[0]
    lines = [f"# {rep['recipe']['name']} on {rep['model']}", ""]
    if rep["recipe"].get("description"):
        lines += [rep["recipe"]["description"].strip(), ""]
    lines += [f"Accuracy on `{ev['data']}`" + (f" (first {ev['limit']} questions)" if ev.get("limit") else "") +
              f"; prefill FLOPs estimated for one image + the prompt {ev['prompt']!r}.", "",
              "| stage | accuracy | % of input | weight MB | x smaller | prefill MFLOPs | x fewer | visual tokens | stage time s | cached |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {100 * r['accuracy']:.2f}% | {_pct(r['pct_of_input'])} | {_mb(r['weight_bytes'])} | "
                     f"{base['weight_bytes'] / r['weight_bytes']:.2f} | {r['prefill_flops'] / 1e6:.1f} | "
                     f"{base['prefill_flops'] / r['prefill_flops']:.2f} | {r['visual_tokens']} | {r.get('stage_wall_s', 0):.0f} | "
                     f"{'yes' if r.get('cached') else 'no'} |")
    src = {r["weight_bytes_source"] for r in rows}
    lines += ["", f"Weight bytes: {', '.join(sorted(src))}. FLOPs are dense counts (2 x MACs): sparsity and low-bit "
                  "weights change the cost per operation on hardware that exploits them, not the count."]
    return "\n".join(lines) + "\n"


def chart(rep: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["rows"]
    acc = [100 * r["accuracy"] for r in rows]
    mb = [r["weight_bytes"] / 1e6 for r in rows]
    mfl = [r["prefill_flops"] / 1e6 for r in rows]
    labels = [r["stage"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, xs, xl in ((axes[0], mb, "weight bytes (MB)"), (axes[1], mfl, "prefill MFLOPs (image + question)")):
        ax.plot(xs, acc, "-o", color="tab:blue")
        for x, y, lab in zip(xs, acc, labels):
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{rep['recipe']['name']} on {rep['model']} ({rep['eval']['data']})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(out: Path, rep: dict) -> dict:
    out = Path(out)
    write_json(out / "report.json", rep)
    with atomic_file(out / "report.md", "w") as f:
        f.write(markdown(rep))
    with atomic_file(out / "report.png") as f:
        f.write(chart(rep))
    return rep
