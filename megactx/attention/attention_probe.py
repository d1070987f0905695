"""Where one row's attention goes: per layer and head, the share of its softmax on chosen key positions (a
needle's tokens), as the engine's attention defines it (DCA's three parts, rotations and temperature included).

The retrieval studies' documented probe (benchmarks/needle_recall.py): LLMEngine.observe_attention installs it, in
one process (not under tensor or context parallelism). Off by default; when on, the backend scores the observed
row against every key at or before it once more per layer, densely: the probabilities say where the model's
attention goes, whatever a sparse plan kept (the prompt's last rows are dense under sparse prefill anyway).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionProbe:
    positions: list[int]  # key positions whose probability is summed
    row: int | None = None  # the observed row's position; None: each prompt's last row
    keep_probs: bool = False  # also keep every probability (small inputs: tests)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H] mass on `positions`
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H, row + 1] with keep_probs

    def row_of(self, prompt_len: int) -> int:
        return prompt_len - 1 if self.row is None else self.row

    def add(self, layer: int, probs: torch.Tensor) -> None:
        # probs: [H, row + 1], each row of heads summing to 1
        idx = torch.tensor([p for p in self.positions if p < probs.shape[1]], dtype=torch.long)
        self.mass[layer] = probs[:, idx].sum(-1).cpu()
        if self.keep_probs:
            self.probs[layer] = probs.cpu()

    def per_layer(self) -> list[float]:
        """Mass on the positions, the heads' mean, layer by layer."""
        return [float(self.mass[layer].mean()) for layer in sorted(self.mass)]
