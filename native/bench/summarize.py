"""Turns edgemm_kernel_bench --json output (one or several runs) into the markdown tables of README.md.

    python native/bench/summarize.py run1.json [run2.json ...]

With several runs, each number is the median over runs of the per-run medians.
"""

import json
import statistics
import sys
from collections import defaultdict


def main():
    runs = [json.load(open(p)) for p in sys.argv[1:]]
    peaks = defaultdict(list)
    for r in runs:
        for k, v in r["peaks"].items():
            peaks[k].append(v)
    rows = defaultdict(lambda: defaultdict(list))
    order = []
    for r in runs:
        for x in r["results"]:
            key = (x["section"], x["name"], x["shape"], x["threads"])
            if key not in rows:
                order.append(key)
            for k, v in x.items():
                if isinstance(v, (int, float)) and k != "threads":
                    rows[key][k].append(v)
    med = lambda v: statistics.median(v) if v else float("nan")
    print("peaks (median over runs): " + ", ".join(f"{k}={med(v):.1f}" for k, v in sorted(peaks.items())))
    print()
    section = None
    for key in order:
        sec, name, shape, th = key
        m = {k: med(v) for k, v in rows[key].items()}
        if sec != section:
            section = sec
            print(f"\n| {sec} | shape | T | median ms | min ms | metrics |")
            print("|---|---|---|---|---|---|")
        metrics = ", ".join(f"{c} {m[c]:.4g}" for c in m if c not in ("median_ms", "min_ms", "max_ms"))
        print(f"| {name} | {shape} | {th} | {m['median_ms']:.3f} | {m['min_ms']:.3f} | {metrics} |")


if __name__ == "__main__":
    main()
