"""RMT-KD: shrink widths to the activation directions above the noise bulk, layer by layer.

The schedule of arXiv 2509.15724 (method.md §6), as a composition of shared parts:

1. for each site, shallow to deep: stream the statistics of its hidden representation over
   the calibration batches (:func:`laserrmt.stats.activations.collect_site_statistics`);
2. ``k`` = the number of directions of its covariance above the Marchenko–Pastur edge, with the
   effective sample size of correlated tokens (:func:`laserrmt.stats.activations.site_rank`,
   τ-quantile start, ``mp_fit`` or ``veraart`` noise estimate);
3. cut the site to ``k`` (:func:`laserrmt.surgery.width.cut_width`);
4. self-distil for a few steps from the model as it was before this cut
   (:func:`laserrmt.distill.distill`);
5. validate; the stop rules:

   * ``k / d < floor``: the spectrum says almost everything at this site is noise, which for a
     trained layer means the fit is not trustworthy (or the site is nearly dead): the site is
     **skipped**, never cut that far;
   * the validation metric falls more than ``tolerance`` below the *uncut* model's: the cut is
     **reverted** (comparing with the baseline, not the previous cut, keeps the total loss
     within the tolerance);
   * the parameter count is at or under ``target_params``: the schedule **stops**.

The result carries the run's width decision as a :class:`~laserrmt.plan.WidthPlan` (the kept
cuts, in order, and the fingerprint of the calibration batches); with ``steps_per_cut=0`` (no
distillation) :func:`laserrmt.surgery.apply.apply_plan` replays it on the original model and
gets the run's model.

Checkpoints: after every site the model (``save_compressed``) and a JSON state (next site,
records, settings, seeds) are written to ``checkpoint_dir``; ``resume=True`` continues from
the last finished site. Every random choice of site ``i`` (batch order, dropout) is drawn from
``seed`` and ``i`` alone, so a resumed run computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from laserrmt.data.classification import ImageFolderData
from laserrmt.data.sources import TextSource
from laserrmt.distill import (
    TASKS,
    Task,
    batch_logits_and_labels,
    distill,
    is_main_process,
    model_inputs,
)
from laserrmt.errors import DataError, InvalidOptionError, PlanError, TargetSelectionError
from laserrmt.evaluate import count_parameters
from laserrmt.models.widths import WidthSite, find_width_sites, shared_channel_sites
from laserrmt.outputs import write_text_atomic
from laserrmt.plan import WidthDecision, WidthPlan
from laserrmt.stats.activations import SiteRank, collect_site_statistics, site_rank
from laserrmt.stats.forward import batches_fingerprint
from laserrmt.surgery.width import cut_width

if TYPE_CHECKING:
    from laserrmt.models.streaming import BlockStream
    from laserrmt.sequential import StreamedRMTKD

__all__ = [
    "DEFAULT_STEPS_PER_CUT",
    "DEFAULT_TOLERANCE",
    "RMTKDResult",
    "SiteRecord",
    "fine_tune_classifier",
    "replay_calibration",
    "rmt_kd",
    "run_rmt_kd",
    "run_rmt_kd_streaming",
    "sequence_classifier_from_encoder",
]

STATE_FILE = "rmt_kd_state.json"
#: Distillation steps after each cut (``--steps-per-cut``'s default in memory).
DEFAULT_STEPS_PER_CUT = 50
_STATE_VERSION = 1
ESTIMATORS = ("mp_fit", "veraart")


@dataclass
class SiteRecord:
    """What happened at one site.

    ``k`` is the width the site was cut to; ``k_rmt`` the number of directions above the MP
    edge (they differ only where the architecture rounds the width, see ``residual_width``).

    ``status`` is ``"kept"`` (cut and kept), ``"reverted"`` (cut, metric fell too far, undone),
    ``"skipped-floor"`` (k/d under the floor), ``"full"`` (all directions are signal: nothing to
    cut), ``"unjudged"`` (the rank rule could not judge the spectrum, ``rank_status`` says why:
    nothing cut), ``"skipped-target"`` (the parameter target was met before this site) or
    ``"skipped-shared"`` (a channel site that feeds a skip connection, which cannot be cut
    alone; ``reason`` says how, see :func:`laserrmt.models.widths.shared_channel_sites`).
    """

    index: int
    site: str
    kind: str
    d: int
    k: int
    sigma: float
    edge: float
    parameters_before: int
    parameters_after: int
    metric_before: float
    metric_after: float
    status: str
    wall_s: float
    seed: int
    k_rmt: int | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    rank_status: str = "ok"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RMTKDResult:
    """The compressed model and the per-site records of the run."""

    model: nn.Module
    records: list[SiteRecord]
    baseline_metric: float
    final_metric: float
    parameters_before: int
    parameters_after: int
    settings: dict[str, Any]
    wall_s: float
    finished: bool = True
    sites: list[WidthSite] = field(default_factory=list)
    plan: WidthPlan = field(default_factory=lambda: WidthPlan([]))

    @property
    def parameter_reduction(self) -> float:
        """Fraction of the parameters removed."""
        return 1.0 - self.parameters_after / self.parameters_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": [r.to_dict() for r in self.records],
            "baseline_metric": self.baseline_metric,
            "final_metric": self.final_metric,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "parameter_reduction": self.parameter_reduction,
            "settings": self.settings,
            "wall_s": self.wall_s,
            "finished": self.finished,
            "plan": self.plan.to_dict(),
        }


def check_options(
    *,
    tau: float,
    estimator: str,
    floor: float,
    tolerance: float | None,
    steps: int,
    lr: float,
    task: str | None = None,
    dataset: str | None = None,
) -> None:
    """Refuse bad RMT-KD options in one line (the command line calls it before loading)."""
    if task is not None and task not in TASKS:
        raise InvalidOptionError(f"task={task!r}; use one of {', '.join(TASKS)}")
    known = DATASETS.get(task, ()) if task is not None else sum(DATASETS.values(), ())
    if dataset is not None and dataset not in known:
        raise InvalidOptionError(f"unknown --dataset {dataset!r}; choose one of {', '.join(known)}")
    if not 0.0 < tau < 1.0:
        raise InvalidOptionError(f"tau={tau}; the MP-fit quantile lies in (0, 1) (RMT-KD: 0.4-0.6)")
    if estimator not in ESTIMATORS:
        raise InvalidOptionError(f"estimator={estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if not 0.0 <= floor < 1.0:
        raise InvalidOptionError(f"floor={floor}; the k/d floor lies in [0, 1)")
    if tolerance is not None and tolerance < 0:
        raise InvalidOptionError(f"tolerance={tolerance}; use a non-negative metric drop")
    if steps < 0 or lr <= 0:
        raise InvalidOptionError(f"steps_per_cut={steps}, lr={lr}; use steps ≥ 0 and lr > 0")


def _parameters(model: nn.Module) -> int:
    return count_parameters(model)["params_total"]


def _resolve_sites(model: nn.Module, sites: Sequence[WidthSite | str] | None) -> list[WidthSite]:
    found = find_width_sites(model)
    if sites is None:
        if not found:
            raise InvalidOptionError(
                f"no width sites found in {type(model).__name__}; pass sites= (WidthSite objects)"
            )
        return found
    by_name = {s.name: s for s in found}
    kinds = {"mlp", "attention", "attn_vo", "attn_qk", "channels"}
    resolved = []
    for site in sites:
        if isinstance(site, WidthSite):
            resolved.append(site)
        elif site == "residual_stream":
            resolved.extend(find_width_sites(model, ["residual"]))
        elif site in kinds:
            resolved.extend(find_width_sites(model, [site]))  # type: ignore[list-item]
        elif site in by_name:
            resolved.append(by_name[site])
        else:
            raise InvalidOptionError(
                f"no width site named {site!r}; use a kind ({', '.join(sorted(kinds))}, "
                f"residual_stream) or a site: {', '.join(by_name) or 'none'}"
            )
    if not resolved:
        raise InvalidOptionError(f"the sites {list(sites)} match nothing in {type(model).__name__}")
    # Several kinds in one call: shallow to deep by first appearance in the default order.
    order = {s.name: i for i, s in enumerate(found)}
    if all(s.name in order for s in resolved):
        resolved.sort(key=lambda s: order[s.name])
    return resolved


def _shared_sites(
    model: nn.Module,
    site_list: list[WidthSite],
    asked: Sequence[WidthSite | str] | None,
    batch: Any,
) -> dict[str, str]:
    """Channel sites that feed a skip connection: a site named by the caller is refused, one
    found by kind is skipped with a warning (and a record saying why)."""
    shared = shared_channel_sites(model, site_list, batch)
    named = {s.name if isinstance(s, WidthSite) else s for s in asked or ()}
    for name, reason in shared.items():
        if name in named:
            raise TargetSelectionError(
                f"width site {name} cannot be cut on its own: {reason}; leave it out of the sites"
            )
    if shared:
        warnings.warn(
            f"RMT-KD skips {len(shared)} of {len(site_list)} width sites that feed a skip "
            "connection (a residual add): "
            + "; ".join(f"{name}: {reason}" for name, reason in shared.items()),
            stacklevel=3,
        )
    return shared


def _save_checkpoint(
    folder: Path, model: nn.Module, state: dict[str, Any], settings: dict[str, Any]
) -> None:
    from laserrmt.surgery.io import save_compressed

    folder.mkdir(parents=True, exist_ok=True)
    name = f"model-{state['next_site']:03d}"
    # A new folder per step, then the state that names it: a kill between the two leaves the
    # previous state pointing at the previous, complete model.
    save_compressed(model, folder / name, settings={"rmt_kd": settings}, overwrite=True)
    previous = state.get("model_folder")
    state["model_folder"] = name
    write_text_atomic(folder / STATE_FILE, json.dumps(state, indent=2) + "\n")
    if previous and previous != name:
        shutil.rmtree(folder / previous, ignore_errors=True)


def _load_checkpoint(folder: Path, original: nn.Module, state: dict[str, Any]) -> nn.Module:
    from laserrmt.surgery.io import load, load_into

    path = folder / str(state["model_folder"])
    residual_cut = any(r["kind"] == "residual" and r["status"] == "kept" for r in state["records"])
    if residual_cut:
        # The residual cut changed the config's hidden_size: rebuild from the saved config.
        model, _ = load(path)
        return model
    return load_into(copy.deepcopy(original), path).eval()


def rmt_kd(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    train_batches: Iterable[Any],
    validate: Callable[[nn.Module], float],
    *,
    task: Task,
    sites: Sequence[WidthSite | str] | None = None,
    tau: float = 0.5,
    estimator: str = "mp_fit",
    floor: float = 0.05,
    tolerance: float = 0.01,
    target_params: int | None = None,
    steps_per_cut: int = DEFAULT_STEPS_PER_CUT,
    lr: float = 1e-4,
    alpha: float = 0.7,
    temperature: float = 1.0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    max_cuts: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RMTKDResult:
    """Compress ``model`` with RMT-KD; the input model is not modified.

    Args:
        model: a CNN (channel sites) or a transformer (MLP sites; the residual stream of a
            Llama-style model when asked for with ``sites=["residual_stream", ...]``).
        calibration_batches: batches in the ``task``'s form (labels are ignored) whose hidden
            representations give the spectra (RMT-KD: ~10 % of the training data).
        train_batches: batches for the distillation fine-tune after each cut.
        validate: the validation metric of a model, **higher is better** (accuracy; pass the
            negative perplexity for a language model).
        task: ``"classification"`` or ``"causal-lm"`` (see :mod:`laserrmt.distill`).
        sites: ``WidthSite`` objects, site names from
            :func:`~laserrmt.surgery.width.find_width_sites`, or kinds (``"mlp"``,
            ``"attention"``, ``"attn_vo"``, ``"attn_qk"``, ``"channels"``,
            ``"residual_stream"``); all found sites by default (MLP and BERT-style attention
            widths of a transformer, channels of a CNN), shallow to deep.
        tau: quantile the MP fit starts from (the compression knob: larger keeps fewer).
        estimator: ``"mp_fit"`` or ``"veraart"``.
        floor: skip a site whose ``k / d`` is under this.
        tolerance: revert a cut whose metric is more than this below the uncut model's.
        target_params: stop once the parameter count is at or under this.
        steps_per_cut, lr, alpha, temperature: the distillation fine-tune after each cut.
        checkpoint_dir: write a checkpoint after every site; ``resume=True`` continues there.
        max_cuts: handle at most this many sites in this call (then return, unfinished): for
            time-sliced runs; the checkpoint lets a later call resume.
        seed: the seed of every random choice (site ``i`` uses ``seed + i``).
        progress: show progress bars.

    Raises:
        InvalidOptionError: bad options, an unknown site, ``resume`` without a checkpoint
            folder, or a checkpoint made with other settings.
        TargetSelectionError: ``sites`` names a channel site that feeds a skip connection
            (found by kind or by default, such a site is skipped with a warning instead).
    """
    check_options(
        task=task,
        tau=tau,
        estimator=estimator,
        floor=floor,
        tolerance=tolerance,
        steps=steps_per_cut,
        lr=lr,
    )
    start = time.perf_counter()
    calibration = [model_inputs(b, task) for b in calibration_batches]
    train = list(train_batches)
    if not calibration or (steps_per_cut > 0 and not train):
        raise InvalidOptionError("pass at least one calibration batch and one training batch")
    original = model
    site_list = _resolve_sites(model, sites)
    shared = _shared_sites(model, site_list, sites, calibration[0])
    settings = {
        "task": task,
        "sites": [s.name for s in site_list],
        "tau": tau,
        "estimator": estimator,
        "floor": floor,
        "tolerance": tolerance,
        "target_params": target_params,
        "steps_per_cut": steps_per_cut,
        "lr": lr,
        "alpha": alpha,
        "temperature": temperature,
        "seed": seed,
    }
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    parameters_before = _parameters(original)

    state: dict[str, Any] | None = None
    if resume:
        if folder is None:
            raise InvalidOptionError("resume=True needs checkpoint_dir, the folder to resume from")
        state_file = folder / STATE_FILE
        if state_file.is_file():
            state = json.loads(state_file.read_text(encoding="utf-8"))
            if state.get("version") != _STATE_VERSION or state.get("settings") != settings:
                raise InvalidOptionError(
                    f"the checkpoint in {folder} was made with other settings; resume with the "
                    "same options, or start afresh in an empty folder"
                )
    if state is not None:
        work = _load_checkpoint(folder, original, state)  # type: ignore[arg-type]
        records = [SiteRecord(**r) for r in state["records"]]
        decisions = [WidthDecision.from_dict(d) for d in state.get("decisions", [])]
        baseline = float(state["baseline_metric"])
        first = int(state["next_site"])
        elapsed_before = float(state.get("wall_s", 0.0))
    else:
        work = copy.deepcopy(original).eval()
        records = []
        decisions = []
        baseline = float(validate(work))
        first = 0
        elapsed_before = 0.0
        state = {"version": _STATE_VERSION, "settings": settings, "baseline_metric": baseline}

    # The metric of the model as it stands: a reverted cut's metric belongs to a discarded model.
    current_metric = next(
        (r.metric_after for r in reversed(records) if r.status != "reverted"), baseline
    )
    handled = 0
    finished = True
    for index in range(first, len(site_list)):
        if max_cuts is not None and handled >= max_cuts:
            finished = False
            break
        site = site_list[index]
        site_seed = seed + index
        t0 = time.perf_counter()
        params_now = _parameters(work)
        if site.name in shared:
            records.append(
                _skipped(
                    index,
                    site,
                    params_now,
                    current_metric,
                    "skipped-shared",
                    site_seed,
                    reason=shared[site.name],
                )
            )
            handled += 1
            continue
        if target_params is not None and params_now <= target_params:
            records.append(
                _skipped(index, site, params_now, current_metric, "skipped-target", site_seed)
            )
            handled += 1
            continue
        stats = collect_site_statistics(work, calibration, [site], progress=False)[site.name]
        choice = site_rank(work, site, stats, tau=tau, estimator=estimator)
        d, k = stats.width, int(choice.rank)
        record = judged(index, site, choice, params_now, current_metric, floor, site_seed)
        if record.status == "cut":
            teacher = work
            work = copy.deepcopy(teacher)
            cut = cut_width(work, site, stats, k)
            # The residual width is rounded up to a multiple of the head count.
            record.k = cut.width_after
            if steps_per_cut > 0:
                log = distill(
                    work,
                    teacher,
                    train,
                    steps=steps_per_cut,
                    lr=lr,
                    alpha=alpha,
                    temperature=temperature,
                    task=task,
                    progress=progress,
                    seed=site_seed,
                )
                record.loss_first, record.loss_last = log.losses[0], log.losses[-1]
            metric = float(validate(work))
            record.metric_after = metric
            if metric < baseline - tolerance:
                record.status = "reverted"
                work = teacher
            else:
                record.status = "kept"
                record.parameters_after = _parameters(work)
                current_metric = metric
                decisions.append(width_decision(site, cut.width_after, cut.kept, record))
            del teacher
        record.wall_s = time.perf_counter() - t0
        records.append(record)
        handled += 1
        if progress:
            print(
                f"rmt-kd {site.name}: d={d} k={k} {record.status} params "
                f"{record.parameters_before}→{record.parameters_after} metric "
                f"{record.metric_before:.4f}→{record.metric_after:.4f}",
                flush=True,
            )
        if folder is not None and is_main_process():
            state["next_site"] = index + 1
            state["records"] = [r.to_dict() for r in records]
            state["decisions"] = [d.to_dict() for d in decisions]
            state["wall_s"] = elapsed_before + time.perf_counter() - start
            _save_checkpoint(folder, work, state, settings)

    return RMTKDResult(
        model=work,
        records=records,
        baseline_metric=baseline,
        final_metric=current_metric,
        parameters_before=parameters_before,
        parameters_after=_parameters(work),
        settings=settings,
        wall_s=elapsed_before + time.perf_counter() - start,
        finished=finished,
        sites=site_list,
        plan=WidthPlan(
            decisions,
            "rmt-kd",
            settings,
            {"fingerprint": batches_fingerprint(calibration), "batches": len(calibration)},
            trained=(
                f"RMT-KD distilled for {steps_per_cut} steps after each cut"
                if steps_per_cut > 0 and decisions
                else ""
            ),
        ),
    )


def judged(
    index: int,
    site: WidthSite,
    choice: SiteRank,
    params: int,
    metric: float,
    floor: float,
    seed: int,
) -> SiteRecord:
    """The record of a measured site, by the stop rules on its rank ``choice``: ``"unjudged"``,
    ``"full"``, ``"skipped-floor"``, or ``"cut"`` (to be cut to ``choice.rank``; the caller
    settles the final status)."""
    d, k = choice.width, int(choice.rank)
    if choice.status != "ok":
        status = "unjudged"
    elif k >= d:
        status = "full"
    elif k < 1 or k / d < floor:
        status = "skipped-floor"
    else:
        status = "cut"
    return SiteRecord(
        index,
        site.name,
        site.kind,
        d,
        k,
        float(choice.sigma),
        float(choice.edge),
        params,
        params,
        metric,
        metric,
        status,
        0.0,
        seed,
        k_rmt=k,
        rank_status=choice.status,
    )


def _skipped(
    index: int,
    site: WidthSite,
    params: int,
    metric: float,
    status: str,
    seed: int,
    reason: str = "",
) -> SiteRecord:
    """The record of a site left at its width without being measured."""
    nan = float("nan")
    return SiteRecord(
        index,
        site.name,
        site.kind,
        site.width,
        site.width,
        nan,
        nan,
        params,
        params,
        metric,
        metric,
        status,
        0.0,
        seed,
        reason=reason,
    )


def width_decision(
    site: WidthSite, width: int, kept: list[int], record: SiteRecord
) -> WidthDecision:
    return WidthDecision(
        site=site.name,
        kind=site.kind,
        width=site.width,
        kept_width=width,
        producers=site.producers,
        followers=site.followers,
        consumer=site.consumer,
        kept=kept if site.kind in ("mlp", "channels") else None,
        reason=f"{record.k_rmt} of {site.width} directions above the Marchenko–Pastur edge",
        extras={"sigma": record.sigma, "edge": record.edge, "k_rmt": record.k_rmt},
    )


# ---------------------------------------------------------------------------------------------
# The pipeline behind `laserrmt compress --method rmt-kd`

DEFAULT_TOLERANCE = {"causal-lm": 0.05, "classification": 1.0}
"""Default stop-rule tolerance: nats of mean NLL (causal LM), accuracy points (classification)."""

DATASETS = {"causal-lm": ("wikipedia",), "classification": ("bbc-news",)}


def sequence_classifier_from_encoder(encoder: nn.Module, num_labels: int) -> nn.Module:
    """A ``…ForSequenceClassification`` built from an encoder's config, with its weights copied.

    The classification head is freshly initialised (train it before compressing). Works for
    any transformers encoder whose sequence-classification class stores it as ``base_model``.

    Raises:
        InvalidOptionError: ``encoder`` is not a transformers model.
    """
    from transformers import AutoModelForSequenceClassification

    config = getattr(encoder, "config", None)
    if config is None:
        raise InvalidOptionError(
            f"{type(encoder).__name__} has no transformers config; pass a transformers encoder"
        )
    config = copy.deepcopy(config)
    config.num_labels = int(num_labels)
    model = AutoModelForSequenceClassification.from_config(config)
    base = getattr(encoder, "base_model", encoder)
    missing, unexpected = model.base_model.load_state_dict(base.state_dict(), strict=False)
    # The pooler may be absent from a sentence-embedding checkpoint; nothing else may be.
    real = [m for m in missing if not m.startswith("pooler.")]
    if real or unexpected:
        raise InvalidOptionError(
            f"the encoder's weights do not fit {type(model).__name__}: missing {real[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return model.eval()


def _accuracy(model: nn.Module, batches: Sequence[dict[str, Any]]) -> float:
    import torch

    hits = total = 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            # Moved to the model's device, wherever the batches were made.
            logits, labels = batch_logits_and_labels(model, batch, "classification")
            hits += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    return 100.0 * hits / total


def _negative_nll(model: nn.Module, windows: Any) -> float:
    from laserrmt.evaluate import perplexity

    return -perplexity(model, windows, progress=False).nll


def fine_tune_classifier(
    model: nn.Module,
    batches: Sequence[dict[str, Any]],
    *,
    epochs: int = 1,
    lr: float = 5e-5,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Plain cross-entropy fine-tuning (AdamW), batches in a seeded order; returns the losses."""
    import random

    import torch

    losses = []
    order_rng = random.Random(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for epoch in range(epochs):
            order = list(range(len(batches)))
            order_rng.shuffle(order)
            for step, i in enumerate(order):
                logits, labels = batch_logits_and_labels(model, batches[i], "classification")
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if progress and step % 20 == 0:
                    print(f"fine-tune epoch {epoch} step {step}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    return losses


def _task_batches(recipe: dict[str, Any], tokenizer: Any) -> tuple[list[Any], list[Any], Any]:
    """``(calibration, train, held-out)`` of the pipeline's data, from its recipe.

    ``causal-lm``: the held-out windows come first, the rest are calibration and training
    batches; ``classification``: the first 10 % of the training batches calibrate, and the
    held-out part is the whole data set (its ``validation`` split is used).
    """
    if recipe["task"] == "causal-lm":
        from laserrmt.data.text import calibration_windows

        if recipe.get("data") is not None:
            windows = TextSource.from_dict(recipe["data"]).windows(
                tokenizer,
                n_windows=recipe["n_windows"],
                window=recipe["window"],
                seed=recipe["seed"],
            )
        else:
            windows = calibration_windows(
                tokenizer,
                n_windows=recipe["n_windows"],
                window=recipe["window"],
                seed=recipe["seed"],
            )
        split = recipe["validation_windows"]
        calibration = [w.unsqueeze(0) for w in windows[split:]]
        return calibration, calibration, windows[:split]
    from laserrmt.data.classification import bbc_news_batches, labelled_batches

    if recipe.get("images") is not None:
        data = ImageFolderData.from_dict(recipe["images"]).batches(
            batch_size=recipe["batch_size"], seed=recipe["seed"]
        )
        return data.train[: max(len(data.train) // 10, 1)], data.train, data
    options = {
        "max_length": recipe["max_length"],
        "batch_size": recipe["batch_size"],
        "seed": recipe["seed"],
    }
    if recipe.get("data") is not None:
        data = labelled_batches(tokenizer, TextSource.from_dict(recipe["data"]), **options)
    else:
        data = bbc_news_batches(tokenizer, **options)
    return data.train[: max(len(data.train) // 10, 1)], data.train, data


def _recipe(
    task: Task,
    dataset: str,
    seed: int,
    sizes: dict[str, int],
    data: TextSource | None,
    images: ImageFolderData | None,
) -> dict[str, Any]:
    """How the run's batches are made (``sizes``: windows for a causal LM, tokens and batch size
    for a classifier), as its width plan records it for a replay."""
    if task == "causal-lm" and not 0 < sizes["validation_windows"] < sizes["n_windows"]:
        raise InvalidOptionError(
            f"validation_windows={sizes['validation_windows']} of n_windows="
            f"{sizes['n_windows']}; keep some windows for calibration and training"
        )
    recipe: dict[str, Any] = {"task": task, "dataset": dataset, "seed": seed, **sizes}
    if data is not None:
        # The recipe names the user's text by content digest: a replay refuses a changed file.
        recipe.update(dataset="user data", data=data.to_dict())
    if images is not None:
        recipe.update(dataset="image folder", images=images.to_dict())
    return recipe


def replay_calibration(plan: WidthPlan, tokenizer: Any) -> list[Any]:
    """The calibration batches of the :func:`run_rmt_kd` run that made ``plan``, rebuilt from
    the recipe it records, as :func:`laserrmt.surgery.apply.apply_plan` takes them.

    Raises:
        PlanError: the plan records no recipe (it was made from batches given in Python: pass
            those to ``apply_plan(..., calibration=...)``).
    """
    recipe = plan.calibration.get("recipe")
    if not isinstance(recipe, dict) or recipe.get("task") not in DATASETS:
        raise PlanError(
            "this width plan records no data recipe (it was made from batches given in Python); "
            "replay it with apply_plan(model, plan, calibration=those batches)"
        )
    calibration, _, _ = _task_batches(recipe, tokenizer)
    return [model_inputs(b, recipe["task"]) for b in calibration]


def run_rmt_kd(
    model: nn.Module,
    tokenizer: Any,
    *,
    task: Task,
    dataset: str | None = None,
    data: TextSource | None = None,
    images: ImageFolderData | None = None,
    sites: Sequence[str] | None = None,
    tau: float = 0.5,
    estimator: str = "mp_fit",
    floor: float = 0.05,
    tolerance: float | None = None,
    target_params: int | None = None,
    steps_per_cut: int = DEFAULT_STEPS_PER_CUT,
    lr: float = 1e-4,
    alpha: float = 0.7,
    temperature: float = 1.0,
    n_windows: int = 32,
    window: int = 256,
    validation_windows: int = 8,
    max_length: int = 128,
    batch_size: int = 16,
    fine_tune_epochs: int = 0,
    fine_tune_lr: float = 5e-5,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    max_cuts: int | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> RMTKDResult:
    """RMT-KD on a task's own data: build the batches, run :func:`rmt_kd`, optionally save.

    ``task="causal-lm"`` (``dataset="wikipedia"``): ``n_windows`` windows of ``window``
    tokens from the pinned protocol's *calibration* split (never its evaluation text), or drawn
    the same way from ``data``, a user's text (:func:`laserrmt.data.sources.open_text_source`); the
    first ``validation_windows`` are the validation set, the rest are both the calibration
    and the training batches (one window per batch). The metric is ``−mean NLL`` in nats (higher
    is better), so ``tolerance`` is in nats (default 0.05).

    ``task="classification"`` (``dataset="bbc-news"``): ``model`` is a sequence classifier
    (see :func:`sequence_classifier_from_encoder`); BBC News tokenized to ``max_length``
    tokens, ``batch_size`` articles per training batch; 10 % of the *training* split
    (stratified) is the validation set, the test split is never used; the first 10 % of the
    training batches are the calibration batches (RMT-KD's "10 % of the training data"). The
    metric is accuracy in percent, ``tolerance`` in points (default 1.0).
    ``fine_tune_epochs > 0`` first fine-tunes the classifier **in place** on the training
    batches (cross-entropy, AdamW at ``fine_tune_lr``; for a head that was just initialised);
    the baseline is then the fine-tuned model, which ``model`` holds afterwards. With
    ``data`` (labelled: ``open_text_source(..., label_column=...)``) the user's rows take BBC
    News's place, split 70/30 by label with ``seed`` (:func:`~laserrmt.data.classification.
    labelled_batches`); the model's head must have one output per distinct label.
    With ``images`` (an ImageFolder-style directory read for this model, see
    :class:`~laserrmt.data.classification.ImageFolderData`) the model is an image classifier:
    80 % of each class trains (10 % of that validates), ``(images, labels)`` batches of
    ``batch_size``; no tokenizer is needed.

    ``checkpoint_dir``, ``resume`` and ``max_cuts`` are those of :func:`rmt_kd` (a run
    sliced with ``max_cuts`` and resumed gives the model after each cut).

    The result's width plan records how its calibration batches were made, so that
    :func:`replay_calibration` rebuilds them for a replay.

    The result's ``settings`` record every option; with ``out_dir`` the compressed model is
    written by :func:`laserrmt.surgery.io.save_compressed` (tokenizer included, RMT-KD records
    in ``laserrmt.json``), and it loads back with :func:`laserrmt.load`.

    Raises:
        InvalidOptionError: an unknown task or dataset, or bad options (see :func:`rmt_kd`).
    """
    if task not in DATASETS:
        raise InvalidOptionError(f"task={task!r}; use one of {', '.join(DATASETS)}")
    dataset = dataset or DATASETS[task][0]
    if dataset not in DATASETS[task]:
        raise InvalidOptionError(
            f"dataset={dataset!r} for task {task}; use one of {', '.join(DATASETS[task])}"
        )
    if images is not None and (task != "classification" or data is not None):
        raise InvalidOptionError(
            "images are classification data on their own; drop the text data or the task"
        )
    if tokenizer is None and images is None:
        raise InvalidOptionError("RMT-KD tokenizes its data; pass the model's tokenizer")
    if data is not None and task == "classification" and data.label_column is None:
        raise InvalidOptionError(
            "classification data needs labels: open it with label_column= (--label-column)"
        )
    tolerance = DEFAULT_TOLERANCE[task] if tolerance is None else tolerance
    sizes = (
        {"n_windows": n_windows, "window": window, "validation_windows": validation_windows}
        if task == "causal-lm"
        else {"max_length": max_length, "batch_size": batch_size}
    )
    recipe = _recipe(task, dataset, seed, sizes, data, images)
    calibration, train, held_out = _task_batches(recipe, tokenizer)
    extra: dict[str, Any] = {k: v for k, v in recipe.items() if k not in ("task", "seed")}
    if task == "causal-lm":

        def validate(m: nn.Module) -> float:
            return _negative_nll(m, held_out)

        extra.update(metric="-nll")
    else:
        outputs = getattr(getattr(model, "config", None), "num_labels", None)
        if outputs is not None and outputs != len(held_out.label_names):
            raise DataError(
                f"the data has {len(held_out.label_names)} labels "
                f"({', '.join(held_out.label_names)}) and the classifier {outputs} outputs; "
                "give a classifier with one output per label, or data with its labels"
            )
        if fine_tune_epochs > 0:
            fine_tune_classifier(
                model, train, epochs=fine_tune_epochs, lr=fine_tune_lr, seed=seed, progress=progress
            )

        def validate(m: nn.Module) -> float:
            return _accuracy(m, held_out.validation)

        extra.update(
            fine_tune_epochs=fine_tune_epochs,
            fine_tune_lr=fine_tune_lr,
            label_names=held_out.label_names,
            metric="accuracy %",
        )
    result = rmt_kd(
        model,
        calibration,
        train,
        validate,
        task=task,
        sites=sites,
        tau=tau,
        estimator=estimator,
        floor=floor,
        tolerance=tolerance,
        target_params=target_params,
        steps_per_cut=steps_per_cut,
        lr=lr,
        alpha=alpha,
        temperature=temperature,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        max_cuts=max_cuts,
        seed=seed,
        progress=progress,
    )
    result.settings = {**result.settings, **extra}
    result.plan.settings = result.settings
    result.plan.calibration.update(recipe=recipe)
    if fine_tune_epochs > 0:
        result.plan.trained = (
            f"the classifier was fine-tuned for {fine_tune_epochs} epoch(s) before the cuts"
        )
    if out_dir is not None:
        from laserrmt.surgery.io import save_compressed

        save_compressed(
            result.model,
            out_dir,
            tokenizer=tokenizer,
            settings={"method": "rmt-kd", "rmt_kd": result.to_dict()},
            overwrite=overwrite,
        )
    return result


def run_rmt_kd_streaming(
    stream: BlockStream,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    data: TextSource | None = None,
    sites: Sequence[str] | None = None,
    tau: float = 0.5,
    estimator: str = "mp_fit",
    floor: float = 0.05,
    n_windows: int = 32,
    window: int = 256,
    validation_windows: int = 8,
    evaluation: Any = None,
    max_shard_size: int = 1_000_000_000,
    seed: int = 0,
    progress: bool = True,
) -> StreamedRMTKD:
    """:func:`run_rmt_kd` on a causal LM through the streaming pipeline
    (:func:`laserrmt.sequential.streamed_rmt_kd`): the same windows from the same recipe, the
    validation windows measuring the model before and after all cuts (the result's
    ``baseline_metric`` and ``final_metric``), the weights written to ``out_dir`` (an existing
    folder) block by block.

    No distillation after each cut and no revert, which need the whole model: the cuts are
    those of ``run_rmt_kd(..., steps_per_cut=0)`` whose tolerance no cut exceeds (and its width
    plan replays them in memory); heal the written model at the end instead
    (:func:`laserrmt.pipeline.heal_saved`). ``evaluation`` windows give the perplexity before
    and after; :func:`laserrmt.surgery.io.write_compressed` with ``weights_written=True`` adds
    the configuration and metadata.
    """
    import torch

    from laserrmt.sequential import streamed_rmt_kd

    if tokenizer is None:
        raise InvalidOptionError("RMT-KD tokenizes its data; pass the model's tokenizer")
    sizes = {"n_windows": n_windows, "window": window, "validation_windows": validation_windows}
    recipe = _recipe("causal-lm", DATASETS["causal-lm"][0], seed, sizes, data, None)
    calibration, _, held_out = _task_batches(recipe, tokenizer)
    outcome = streamed_rmt_kd(
        stream,
        torch.cat(calibration),
        out_dir,
        sites=sites,
        tau=tau,
        estimator=estimator,
        floor=floor,
        validation=held_out,
        evaluation=evaluation,
        max_shard_size=max_shard_size,
        seed=seed,
        progress=progress,
    )
    result = outcome.result
    extra = {k: v for k, v in recipe.items() if k not in ("task", "seed")}
    result.settings = {"task": "causal-lm", **result.settings, **extra, "metric": "-nll"}
    result.plan.settings = result.settings
    result.plan.calibration.update(recipe=recipe)
    return outcome
