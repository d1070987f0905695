"""SparseProbe: what sparse prefill did, call by call, for benchmarks and tests. Off by default.

    probe = SparseProbe(dense_layers=None, record_plans=True)   # compare every layer with dense attention
    llm.engine.observe_sparse(probe)
    llm.generate(long_prompt, ...)
    probe.attention_s[layer], probe.recall(layer), probe.calls[0].plan

Each sparse call (one layer, one planned piece of a prefill chunk) adds a SparseCall: its rows, the plan's
density, whether it fell back to dense attention, the seconds spent estimating and computing. For the layers in
`dense_layers` the attention backend also computes the dense attention of the same rows right after, on the
same inputs, and the probe keeps its time and the recall exp(lse_sparse - lse_dense) per head (the share of the
softmax mass the plan kept, summed over rows). The engine's output is always the sparse one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SparseCall:
    layer: int
    q_start: int
    rows: int
    density: float  # share of the causal pairs the plan computes
    fallback: bool  # computed densely: the plan was denser than max_density
    estimate_s: float
    attention_s: float
    plan: list | None = None  # [H][blocks] BlockKeys, with record_plans
    block: int = 0  # query rows per plan block: block k starts at q_start + k * block
    dense_s: float | None = None  # the same rows densely, for a compared layer
    recall_sum: torch.Tensor | None = None  # [H] float64: sum over rows of exp(lse_sparse - lse_dense)


@dataclass
class SparseProbe:
    dense_layers: set[int] | None = field(default_factory=set)  # layers also computed densely; None: every layer
    record_plans: bool = False
    calls: list[SparseCall] = field(default_factory=list)

    def compares(self, layer: int) -> bool:
        return self.dense_layers is None or layer in self.dense_layers

    def add_dense(self, lse_sparse: torch.Tensor, lse_dense: torch.Tensor, seconds: float) -> None:
        """The last call's rows computed densely: lse [n, H] both ways."""
        call = self.calls[-1]
        call.dense_s = seconds
        call.recall_sum = torch.exp(lse_sparse.float() - lse_dense.float()).double().sum(0).cpu()

    def _per_layer(self, value) -> dict[int, float]:
        out: dict[int, float] = {}
        for c in self.calls:
            v = value(c)
            if v is not None:
                out[c.layer] = out.get(c.layer, 0.0) + v
        return out

    @property
    def estimate_s(self) -> dict[int, float]:
        return self._per_layer(lambda c: c.estimate_s)

    @property
    def attention_s(self) -> dict[int, float]:
        """The sparse kernel, or the dense fallback, per layer."""
        return self._per_layer(lambda c: c.attention_s)

    @property
    def dense_s(self) -> dict[int, float]:
        return self._per_layer(lambda c: c.dense_s)

    @property
    def fallbacks(self) -> dict[int, int]:
        return {k: int(v) for k, v in self._per_layer(lambda c: float(c.fallback)).items() if v}

    def densities(self, layer: int, computed: bool = False) -> list[float]:
        """The plans' densities in call order; computed: 1.0 where the call fell back to dense."""
        return [1.0 if computed and c.fallback else c.density for c in self.calls if c.layer == layer]

    def summary(self) -> dict:
        """What a whole prefill's sparse calls did: the share of the causal (query, key) pairs they computed
        (fallbacks counted whole; pair-weighted over calls), and the seconds spent estimating and attending."""
        pairs = [c.rows * c.q_start + c.rows * (c.rows + 1) / 2 for c in self.calls]
        computed = sum(p * (1.0 if c.fallback else c.density) for p, c in zip(pairs, self.calls))
        estimate, attention = sum(c.estimate_s for c in self.calls), sum(c.attention_s for c in self.calls)
        return {"sparse_density": round(computed / sum(pairs), 4) if pairs else None,
                "estimate_s": round(estimate, 2), "sparse_attention_s": round(attention, 2),
                "fallbacks": sum(c.fallback for c in self.calls)}

    def recall(self, layer: int) -> torch.Tensor | None:
        """[H] mean recall over the compared rows of this layer, or None when it was not compared."""
        sums = [(c.recall_sum, c.rows) for c in self.calls if c.layer == layer and c.recall_sum is not None]
        if not sums:
            return None
        return sum(s for s, _ in sums) / sum(n for _, n in sums)
