"""Figures for people: spectral densities against the Marchenko–Pastur law, and block × role maps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI

import matplotlib.pyplot as plt
import numpy as np

from laserrmt.rmt import choose_rank, mp_density, mp_support


def plot_spectral_density(
    singular_values: np.ndarray,
    shape: tuple[int, int],
    sigma: float,
    path: Path,
    *,
    title: str,
    kept_edge: float | None = None,
    kept_label: str = "chosen threshold",
) -> Path:
    """Empirical eigenvalue density of WᵀW/N with the fitted MP density and the edges marked.

    Eigenvalues are λ = s²/N, so pure noise of entry scale σ fills [σ²(1−√β)², σ²(1+√β)²].
    """
    m, n = shape
    big, small = max(m, n), min(m, n)
    beta = small / big
    lam = np.asarray(singular_values, dtype=np.float64) ** 2 / big
    lo, hi = mp_support(beta, sigma) if sigma > 0 else (0.0, 0.0)
    tw = choose_rank(singular_values, shape, "tw", sigma=sigma)

    # Log axis: the bulk and spikes orders of magnitude above it fit on one picture. Densities
    # are of u = log10 λ, so the MP law is drawn as ρ(λ)·λ·ln 10.
    positive = lam[lam > 0]
    u = np.log10(positive)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    counts, _, _ = ax.hist(
        u,
        bins=min(80, max(10, len(u) // 5)),
        density=True,
        alpha=0.55,
        color="#4c72b0",
        label=f"empirical ({len(lam)} eigenvalues)",
    )
    if hi > 0:
        grid = np.geomspace(max(lo, hi * 1e-4), hi, 400)
        in_bulk = np.count_nonzero(positive <= hi) / len(positive)
        curve = mp_density(grid, beta, sigma) * grid * np.log(10) * in_bulk
        ax.plot(
            np.log10(grid),
            curve,
            color="#dd8452",
            lw=2,
            label=f"Marchenko–Pastur fit (σ={sigma:.3g})",
        )
        ax.axvline(np.log10(hi), color="#dd8452", ls="--", lw=1.2, label="MP edge")
    if tw.status == "ok" and tw.edge > 0:  # a spectrum too short has no edge to draw
        ax.axvline(
            np.log10(tw.edge**2 / big),
            color="#55a868",
            ls=":",
            lw=1.4,
            label="Tracy–Widom edge (α=0.05)",
        )
    if kept_edge is not None and math.isfinite(kept_edge) and kept_edge > 0:
        ax.axvline(np.log10(kept_edge**2 / big), color="#c44e52", ls="-.", lw=1.2, label=kept_label)
    ax.set_ylim(0, 1.3 * float(np.max(counts)))
    ax.set_xlabel("log10 eigenvalue of WᵀW / N")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_block_role_heatmap(
    records: Sequence[dict[str, Any]],
    value: str,
    path: Path,
    *,
    title: str,
    cmap: str = "viridis",
) -> Path | None:
    """A grid of blocks (rows) × matrix roles (columns) coloured by ``value``.

    Returns ``None`` (and draws nothing) when no record has both a block and a role, e.g. a CNN.
    """
    cells = [r for r in records if r.get("block") is not None and r.get("role")]
    if not cells:
        return None
    roles = sorted({r["role"] for r in cells})
    blocks = sorted({r["block"] for r in cells})
    grid = np.full((len(blocks), len(roles)), np.nan)
    for r in cells:
        v = r[value]
        grid[blocks.index(r["block"]), roles.index(r["role"])] = v if math.isfinite(v) else np.nan
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(roles), 1.2 + 0.22 * len(blocks)), dpi=110)
    image = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xticks(range(len(roles)), roles, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
