"""Sparse prefill (MInference, arXiv 2407.02490) for prompts above a threshold.

patterns.py per-head patterns and budgets (sparse_attention_config.json) and the settings in effect
estimate.py the vertical-slash estimate: columns and diagonals from a prefill chunk's last queries
pooled.py   the pooled block estimate: query rows against 64-key group means (the default without budgets)
plan.py     the key ranges each query block computes; kernel.py computes them and returns the log-sum-exp
batched.py  the same computation for plans of many short ranges (pooled), in a few batched flash calls
prefill.py  one prefill chunk: estimate, plan, compute; probe.py records what it did, when asked
"""
