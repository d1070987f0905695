"""Plots of evaluation results (matplotlib, no display needed)."""
from __future__ import annotations

PASSKEY_COLOURS = ["#F0496E", "#EBB839", "#0CD79F"]  # red -> yellow -> green, as in Qwen2.5-1M's figures


def length_label(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def passkey_heatmap(lengths: list[int], depths: list[int], grid: list[list[float]], path: str,
                    title: str = "Passkey retrieval") -> str:
    """x: context length, y: depth from top (0 %) to bottom (100 %), colour: accuracy 0-100 %."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("passkey", PASSKEY_COLOURS)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.45 * len(depths)))
    image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
