"""How good a tokenizer is: held-out PSNR and code usage, reconstruction grids, usage plots.

Used at the end of `tokenizer train` and by `beitdomain tokenizer inspect`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from beitdomain.fileio import atomic_save, make_dirs
from beitdomain.tokenizer.codebook import CodeUsage
from beitdomain.tokenizer.dvae import DiscreteVAE, psnr


@torch.no_grad()
def save_reconstruction_grid(
    model: DiscreteVAE, images: torch.Tensor, path: Path, title: str | None = None
) -> Path:
    """A PNG with each original above its reconstruction from tokens, rows labelled."""
    from beitdomain.eval.grids import paired_grid

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = images.to(device)
    recon = model.decode_tokens(model.encode(x)).float().clamp(0, 1)
    model.train(was_training)
    img = paired_grid(
        x.float().cpu().numpy(),
        recon.cpu().numpy(),
        labels=("original", "from tokens"),
        title=title,
    )
    make_dirs(path.parent, f"write {path.name}")
    atomic_save(path, lambda f: img.save(f, format="PNG"))
    return path


@torch.no_grad()
def evaluate_tokenizer(
    model: DiscreteVAE, images: torch.Tensor, batch_size: int = 64
) -> dict[str, float]:
    """PSNR (from hard tokens, as pre-training sees them) and code usage on `images`."""
    model.eval()
    device = next(model.parameters()).device
    usage = CodeUsage(model.vocab_size)
    total_psnr, n = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device)
        tokens = model.encode(x)
        usage.update(tokens)
        recon = model.decode_tokens(tokens).float()
        total_psnr += float(psnr(recon, x.float())) * x.shape[0]
        n += x.shape[0]
    return {
        "psnr": total_psnr / max(n, 1),
        "fraction_used": usage.fraction_used,
        "perplexity": usage.perplexity,
        "images": float(n),
        "usage_counts": usage.counts.tolist(),
    }


def plot_code_usage(counts: list[int] | np.ndarray, path: Path, title: str = "") -> Path:
    """Histogram of code frequencies, sorted, with the fraction in use."""
    from matplotlib.figure import Figure

    c = np.sort(np.asarray(counts, dtype=float))[::-1]
    used = (c > 0).mean()
    fig = Figure(figsize=(7, 3.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(len(c)), c / max(c.sum(), 1), width=1.0, color="#3b6ea5")
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("share of tokens")
    ax.set_title(f"{title} {100 * used:.1f}% of {len(c)} codes used".strip())
    fig.tight_layout()
    make_dirs(path.parent, f"write {path.name}")
    atomic_save(path, lambda f: fig.savefig(f, format="png"))
    return path
