"""Activation spectra: how many directions of each hidden width stand above the noise bulk.

The measurement half of RMT-KD (arXiv 2509.15724, method.md §6) without the cutting: for every
width site (:func:`laserrmt.models.widths.find_width_sites`: MLP intermediate widths, per-head
attention value and query/key widths, CNN channels) the statistics of its hidden representation
are streamed over calibration batches in float64, and the Marchenko–Pastur rule on the
covariance with the effective sample size (:func:`laserrmt.stats.activations.site_rank`, the
very rule RMT-KD's cuts use) says how many of its ``d`` directions are signal. ``k / d`` is the
width the site would keep.

Used by ``laserrmt analyze --activations``; :func:`write_activation_report` writes the table,
a bar chart of ``k / d`` per site, spectral densities of a few sites and ``report.html``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from laserrmt.errors import InvalidOptionError
from laserrmt.models.widths import WidthSite, find_width_sites
from laserrmt.stats.activations import SiteStatistics, collect_site_statistics, site_rank

__all__ = [
    "ACTIVATION_COLUMNS",
    "activation_table_rows",
    "analyze_activations",
    "plot_kept_fraction",
    "write_activation_report",
]

ACTIVATION_COLUMNS: tuple[str, ...] = (
    "site",
    "kind",
    "d",
    "k",
    "k/d",
    "sigma",
    "edge",
    "n",
    "n_eff",
    "status",
)
"""The columns of the activation table, in order (see :func:`activation_table_rows`)."""

# Bytes of float64 second moments gathered in one calibration pass: bounds memory on wide
# models (SmolLM2's 30 MLP sites alone would hold 0.57 GB at once).
_PASS_BYTES = 256 * 2**20


def _passes(sites: Sequence[WidthSite]) -> list[list[WidthSite]]:
    groups: list[list[WidthSite]] = [[]]
    used = 0
    for site in sites:
        cost = site.width**2 * 8 * (2 if site.kind == "attn_qk" else 1)
        if groups[-1] and used + cost > _PASS_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(site)
        used += cost
    return [g for g in groups if g]


def _singular_values(statistics: SiteStatistics) -> np.ndarray:
    """Singular values ``sqrt(n λ)`` of the centred ``d × n`` activation matrix, descending,
    with ``n`` the effective sample size (the scale the MP edge of the decision is drawn on)."""
    c = statistics.covariance().cpu().numpy()
    eigenvalues = np.clip(np.linalg.eigvalsh((c + c.T) / 2)[::-1], 0.0, None)
    n = max(int(statistics.independent_rows), 1)
    return np.sqrt(n * eigenvalues[: min(len(eigenvalues), n)])


def analyze_activations(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    tau: float = 0.5,
    estimator: str = "mp_fit",
    sites: Sequence[WidthSite | str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The MP width decision of every width site of ``model`` on calibration ``batches``.

    Args:
        model: a transformer (MLP and BERT-style attention sites) or a plain CNN (channels).
        batches: model inputs: ``input_ids`` tensors, keyword dicts, or image tensors.
        tau: the quantile the MP fit starts from (as in ``rmt-kd``; larger keeps fewer).
        estimator: ``"mp_fit"`` or ``"veraart"``.
        sites: ``WidthSite`` objects, site names or kinds (``"mlp"``, ``"attention"``,
            ``"channels"``); every site found by default.
        progress: show a progress bar over calibration passes.

    Returns:
        One dict per site, shallow to deep: ``site``, ``kind``, ``d``, ``k`` (directions above
        the MP edge; for attention ``heads × max per-head count``), ``k_over_d``, ``sigma``
        (noise scale), ``edge`` (the MP edge in singular-value units of the ``d × n``
        activation matrix), ``n_samples`` (tokens or spatial positions), ``n_effective`` (the
        independent samples they are worth), ``per_head`` (attention
        only, else ``None``) and ``singular_values`` (a numpy array, for plots; for attention
        sites those of all heads together, the value or query projection).

    Raises:
        InvalidOptionError: bad options, no batches, or a site that is not in ``model``.
    """
    if not 0.0 < tau < 1.0:
        raise InvalidOptionError(f"tau={tau}; the MP-fit quantile lies in (0, 1)")
    if estimator not in ("mp_fit", "veraart"):
        raise InvalidOptionError(f"estimator={estimator!r}; use 'mp_fit' or 'veraart'")
    listed = list(batches)
    if not listed:
        raise InvalidOptionError("no calibration batches; pass at least one batch")
    found = find_width_sites(model)
    chosen: list[WidthSite] = []
    if sites is None:
        chosen = found
    else:
        by_name = {s.name: s for s in found}
        for site in sites:
            if isinstance(site, WidthSite):
                chosen.append(site)
            elif site in by_name:
                chosen.append(by_name[site])
            elif site in ("mlp", "attention", "attn_vo", "attn_qk", "channels"):
                chosen.extend(find_width_sites(model, [site]))  # type: ignore[list-item]
            else:
                raise InvalidOptionError(
                    f"no width site or kind {site!r}; sites: {', '.join(by_name) or 'none'}"
                )
    if not chosen:
        raise InvalidOptionError(
            f"{type(model).__name__} offers no width site (MLP, BERT attention or CNN channels)"
        )
    records: list[dict[str, Any]] = []
    for group in tqdm(_passes(chosen), desc="activation spectra", disable=not progress):
        stats = collect_site_statistics(model, listed, group, progress=False)
        for site in group:
            st = stats[site.name]
            decision = site_rank(model, site, st, tau=tau, estimator=estimator)
            records.append(
                {
                    "site": site.name,
                    "kind": site.kind,
                    "d": decision.width,
                    "k": decision.rank,
                    "k_over_d": decision.rank / decision.width,
                    "sigma": decision.sigma,
                    "edge": decision.edge,
                    "n_samples": st.n_samples,
                    "n_effective": st.independent_rows,
                    "per_head": decision.per_head,
                    "status": decision.status,
                    "singular_values": _singular_values(st),
                }
            )
    return records


def activation_table_rows(records: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Rows for :data:`ACTIVATION_COLUMNS` (for ``Table`` or ``markdown_table``)."""
    return [
        [
            r["site"],
            r["kind"],
            r["d"],
            r["k"],
            r["k_over_d"],
            r["sigma"],
            r["edge"],
            r["n_samples"],
            r["n_effective"],
            r["status"],
        ]
        for r in records
    ]


def plot_kept_fraction(records: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """A bar chart of ``k / d`` per site, coloured by site kind."""
    # Through the plots module, which selects the headless Agg backend before pyplot loads.
    from laserrmt.report.plots import plt

    kinds = sorted({r["kind"] for r in records})
    colours = {kind: f"C{i}" for i, kind in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(max(6.4, 0.22 * len(records) + 2), 3.8), dpi=110)
    x = np.arange(len(records))
    ax.bar(x, [r["k_over_d"] for r in records], color=[colours[r["kind"]] for r in records])
    ax.set_xticks(x, [r["site"] for r in records], rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("k / d  (directions above the MP edge)")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds]
    ax.legend(handles, kinds, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_activation_report(
    records: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    model_source: str = "",
    settings: dict[str, Any] | None = None,
    plot_sites: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``activations.json``, ``activations.csv``, ``activations.md``, figures and
    ``report.html`` atomically into ``out_dir`` (an existing folder only with ``overwrite``).

    ``plot_sites`` names the sites whose spectral density is drawn (default: the first, a
    middle and the last site).
    """
    from laserrmt.outputs import atomic_output_dir
    from laserrmt.report.html import Report, Table, markdown_table
    from laserrmt.report.plots import plot_spectral_density

    if not records:
        raise InvalidOptionError("no activation records to write; analyse at least one site")
    start = time.perf_counter()
    plain = [{k: v for k, v in r.items() if k != "singular_values"} for r in records]
    rows = activation_table_rows(records)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "activations.json").write_text(
            json.dumps({"settings": settings or {}, "sites": plain}, indent=2) + "\n",
            encoding="utf-8",
        )
        with (tmp / "activations.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(ACTIVATION_COLUMNS)
            writer.writerows(rows)
        (tmp / "activations.md").write_text(
            markdown_table(ACTIVATION_COLUMNS, rows) + "\n", encoding="utf-8"
        )
        figures = [
            (
                "k / d per site",
                plot_kept_fraction(
                    records, tmp / "kept_fraction.png", title="activation width kept (MP rule)"
                ),
            )
        ]
        by_name = {r["site"]: r for r in records}
        wanted = list(plot_sites) if plot_sites is not None else []
        if plot_sites is None:
            wanted = list(
                dict.fromkeys(
                    r["site"] for r in (records[0], records[len(records) // 2], records[-1])
                )
            )
        for name in wanted:
            if name not in by_name:
                raise InvalidOptionError(f"plot_sites: no analysed site named {name!r}")
            r = by_name[name]
            if r["sigma"] <= 0 or len(r["singular_values"]) == 0:
                continue
            path = tmp / f"esd_{name.replace('.', '_')}.png"
            plot_spectral_density(
                np.asarray(r["singular_values"]),
                (int(r["d"]), max(int(r["n_effective"]), 1)),
                float(r["sigma"]),
                path,
                title=f"{name}  d={r['d']}  k={r['k']}  (k/d {r['k_over_d']:.2f})",
                kept_edge=None if r["per_head"] is not None else float(r["edge"]),
                kept_label="MP edge",
            )
            figures.append((f"Activation spectrum of {name}", path))
        mean = float(np.mean([r["k_over_d"] for r in records]))
        report = Report(
            title="Activation spectra (RMT-KD widths)",
            summary=[
                ("model", model_source),
                ("sites", len(records)),
                ("mean k/d", mean),
                *[(k, v) for k, v in (settings or {}).items()],
            ],
            notes=[
                "k = directions of each hidden width whose eigenvalues lie above the "
                "Marchenko–Pastur edge of the fitted noise bulk; attention sites keep the "
                "largest per-head count in every head. Attention spectra are drawn for all "
                "heads together, so their edge (a per-head quantity) is not marked."
            ],
            tables=[Table("Widths per site", ACTIVATION_COLUMNS, rows)],
            figures=figures,
        )
        report.summary.append(("wall time s", time.perf_counter() - start))
        report.write(tmp / "report.html")
    return Path(out_dir)
