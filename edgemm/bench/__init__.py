"""`edgemm bench`: runtime benchmarks with random weights and real models' shapes (docs/bench.md).

presets.py builds the models (demo, smolvlm-256m, llava-qwen1.8b), core.py exports them through
edgemm.export into a cache and runs every measurement in a subprocess (worker.py), metrics.py turns
rates into fractions of this machine's int8 peak and read bandwidth, report.py prints tables and draws
the chart.
"""

from .core import PRECISIONS, RUNTIMES, run_bench
from .presets import PRESETS

__all__ = ["run_bench", "PRESETS", "RUNTIMES", "PRECISIONS"]
