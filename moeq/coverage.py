"""Expert coverage of calibration: per-layer x per-expert routed token counts as a
heatmap PNG plus the same numbers as JSON, written next to the export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_coverage(tokens_per_expert: dict[str, list[int]], out_dir: "str | Path", stem: str = "expert_coverage") -> tuple[Path, Path]:
    out = Path(out_dir)
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    names = list(tokens_per_expert)
    json_path.write_text(json.dumps({"tokens_per_expert": tokens_per_expert,
                                     "never_routed": {n: [e for e, c in enumerate(v) if c == 0] for n, v in tokens_per_expert.items()}},
                                    indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max((len(v) for v in tokens_per_expert.values()), default=1)
    grid = np.full((max(len(names), 1), width), np.nan)
    for i, n in enumerate(names):
        grid[i, : len(tokens_per_expert[n])] = tokens_per_expert[n]
    fig, ax = plt.subplots(figsize=(min(max(7, 2 + width * 0.35), 24), 1.5 + 0.4 * max(len(names), 1)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for i, n in enumerate(names):
        for e, c in enumerate(tokens_per_expert[n]):
            if c == 0:
                ax.text(e, i, "x", ha="center", va="center", color="red", fontsize=8)
    ax.set_yticks(range(len(names)), [n.replace(".mlp.experts", "").replace("model.", "") for n in names], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title("calibration tokens routed per expert (x = never routed)")
    fig.colorbar(im, ax=ax, label="tokens")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path, json_path
