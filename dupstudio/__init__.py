"""dupstudio: study 2-bit quantized LLMs with shared-weight layer replication."""

__version__ = "0.1.0"
