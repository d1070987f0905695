"""Sparse prefill (MInference, arXiv 2407.02490): per-head vertical and slash patterns estimated from the last
queries of a prefill chunk. Estimation is here; the kernel and its integration follow."""
