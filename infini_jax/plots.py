"""PNG figures (matplotlib, Agg backend): passkey heatmap, gate values (paper Figure 3), loss by segment."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from etils import epath

from infini_jax import paths


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _length_label(n: int) -> str:
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1000 and n % 1024 == 0:
        return f"{n // 1024}K"
    if n >= 1000:
        return f"{n / 1000:.0f}k"
    return str(n)


def passkey_heatmap(sweep: dict, path: epath.PathLike, title: str = "Passkey retrieval: digit accuracy (%)") -> epath.Path:
    """sweep = evaluate.passkey_sweep(...): rows = depth (0% at top), columns = prompt length."""
    plt = _plt()
    acc = np.asarray(sweep["digit_accuracy"], float) * 100  # [n_depths, n_lengths]
    lengths, depths = sweep["lengths"], sweep["depths"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey depth")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", fontsize=8,
                    color="black" if 25 < acc[i, j] < 85 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def gate_plot(gates_lh, path: epath.PathLike, title: str = "Gates sigmoid(β) per head and layer") -> epath.Path:
    """gates [num_layers, num_heads] (model.gate_values): one row of bars per layer, like the paper's Figure 3."""
    plt = _plt()
    gates_lh = np.asarray(gates_lh, float)
    n_layers, n_heads = gates_lh.shape
    fig, axes = plt.subplots(n_layers, 1, figsize=(max(6.0, 0.35 * n_heads + 1.5), 1.3 + 0.8 * n_layers),
                             sharex=True, squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        g = gates_lh[layer]
        colors = ["tab:blue" if v < 0.3 else "tab:red" if v > 0.7 else "tab:gray" for v in g]
        ax.bar(range(n_heads), g, color=colors)
        ax.axhline(0.5, color="black", lw=0.5, ls=":")
        ax.set_ylim(0, 1)
        ax.set_yticks([0, 0.5, 1])
        ax.set_ylabel(f"layer {layer}", fontsize=8)
    axes[-1, 0].set_xticks(range(n_heads))
    axes[-1, 0].set_xlabel("head")
    axes[0, 0].set_title(f"{title} (0 = local only, 1 = memory only)\n"
                         "blue < 0.3: local  |  gray: mixer  |  red > 0.7: memory", fontsize=9)
    return _save(fig, path)


def segment_curve_plot(curves: dict, path: epath.PathLike, min_tokens: int = 1,
                       title: str = "Loss by segment position within the document",
                       ylabel: str = "mean NLL (nats/token)", log_x: bool = False) -> epath.Path:
    """curves: {label: evaluate_perplexity(...)["segment_curve"]}, e.g. {"memory": ..., "knock-out": ...}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, curve in curves.items():
        seg, loss, tok = (np.asarray(curve[k]) for k in ("segment", "loss", "tokens"))
        keep = tok >= min_tokens
        ax.plot(seg[keep], loss[keep], marker="." if keep.sum() < 60 else None, label=label)
    from matplotlib.ticker import MaxNLocator

    if log_x:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("segment index within document")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path) -> epath.Path:
    path = paths.resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with path.open("wb") as f:  # through epath: gs:// works
        fig.savefig(f, format="png", dpi=120)
    _plt().close(fig)
    return path


def plot_all(results: dict, out_dir: epath.PathLike, gates_lh: Optional[Sequence] = None) -> list[epath.Path]:
    """The PNGs that `results` (eval.py's JSON) allows: passkey.png, gates.png, segment_loss.png."""
    out_dir, made = paths.resolve(out_dir), []
    if results.get("passkey"):
        made.append(passkey_heatmap(results["passkey"], out_dir / "passkey.png"))
    if gates_lh is not None:
        made.append(gate_plot(gates_lh, out_dir / "gates.png"))
    curves = {name: results[key]["segment_curve"] for key, name in (("perplexity", "memory"),
                                                                      ("knockout", "memory knocked out"))
              if results.get(key) and "segment_curve" in results[key]}
    if curves:
        made.append(segment_curve_plot(curves, out_dir / "segment_loss.png", min_tokens=1))
    return made
