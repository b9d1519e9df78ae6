"""TIDE-TRT: Temporal Incremental Draft Engine — self-improving speculative decoding served by Triton."""

__version__ = "0.1.0"
