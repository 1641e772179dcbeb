"""edgemm: compress, export and run multimodal LLMs on phones and laptops."""

__version__ = "0.1.0"
