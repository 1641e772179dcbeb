"""edgemm: compress, export and run multimodal LLMs on phones and laptops.

`edgemm.load(model_or_bundle, runtime=None)` opens a model or an exported bundle and returns a Session
with `generate(image, prompt, stream=False)`; see edgemm/api.py and docs/apps.md.
"""

__version__ = "0.1.0"

from .api import load  # noqa: E402  (light: imports nothing heavy until called)

__all__ = ["load", "__version__"]
