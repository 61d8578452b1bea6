"""The loss-curve PNG of a run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_losses(train: list[tuple[int, float]], evals: list[tuple[int, float]], out: Path,
                title: str = "tunefix") -> Path | None:
    if not train:
        return None
    from tunefix._io import atomic_path

    fig, ax = figure((7, 4))
    steps, losses = zip(*train, strict=True)
    ax.plot(steps, losses, label="train loss", color="#1f77b4", linewidth=1.2)
    if evals:
        es, el = zip(*evals, strict=True)
        ax.plot(es, el, "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def figure(size: tuple[float, float], dpi: int = 110):
    """A matplotlib figure and its axes drawn by the Agg canvas directly: no pyplot, so no
    backend switched for the whole process (``matplotlib.use``) and no figure kept in
    pyplot's registry (a notebook's own plots stay as the user set them)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()
