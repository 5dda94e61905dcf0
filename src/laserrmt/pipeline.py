"""``compress``: analysis → plan → surgery, as one call (the CLI adds evaluation, saving, report).

Every method is configuration of the same parts; :class:`CompressSettings` holds all options and
is written to ``laserrmt.json`` so that a run can be repeated exactly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from laserrmt.analyze import AnalysisResult, analyze_model
from laserrmt.data.sources import TextSource, open_text_source
from laserrmt.data.text import PROTOCOL_NAME
from laserrmt.distill import TopKLogits, require_process_group
from laserrmt.errors import InvalidOptionError, NumericalError, PlanError
from laserrmt.evaluate import PerplexityResult, perplexity
from laserrmt.methods.budget import ALLOCATIONS, budget_plan, replay_factors
from laserrmt.methods.heal import (
    HEAL_TOP_K,
    LORA_RANK,
    check_healing_options,
    heal,
    healing_steps,
    healing_teacher,
)
from laserrmt.methods.laser import (
    LASERRMT_CANDIDATES,
    SCORES,
    SELECTIONS,
    LoopStep,
    laser_loop,
    oneshot_plan,
)
from laserrmt.methods.objectives import OBJECTIVES, make_objective
from laserrmt.models.placement import (
    check_trainable_dtype,
    place_model,
    resolve_device,
    resolve_dtype,
)
from laserrmt.models.streaming import BlockStream
from laserrmt.models.targets import find_targets, select_targets
from laserrmt.plan import MODES, CompressionPlan
from laserrmt.rmt import SIGMA_ESTIMATORS, THRESHOLD_METHODS
from laserrmt.stats.importance import IMPORTANCE_KINDS
from laserrmt.surgery.apply import apply_plan
from laserrmt.surgery.io import weight_bytes
from laserrmt.surgery.lowbit import quantize_model_lowbit
from laserrmt.surgery.quantize import quantize_model_int8
from laserrmt.surgery.shards import rewrite_weights
from laserrmt.surgery.sparse import check_sparse_share, input_gram_diagonals, sparse_factorizer
from laserrmt.surgery.whiten import WHITEN_METHODS

METHODS = ("laser", "budget", "rmt-kd")
#: The calibration windows of every method: the pinned protocol's calibration split
#: (:func:`laserrmt.data.text.calibration_windows`), as plans name them.
CALIBRATION_SOURCE = f"{PROTOCOL_NAME} calibration split"
#: How plans name calibration windows drawn from a user's text (``--calibration-data``); the
#: record's ``data`` is the :class:`~laserrmt.data.sources.TextSource`, content digest included.
USER_CALIBRATION_SOURCE = "user data"
QUANTIZATIONS = ("int8", "int6", "int5", "int4", "int3", "int2")
#: Low-bit quantizations (group-wise, :mod:`laserrmt.surgery.lowbit`) and their bits.
LOWBIT = {"int6": 6, "int5": 5, "int4": 4, "int3": 3, "int2": 2}
#: ``rmt``: a low-rank correction of each low-bit weight's error where its activation-weighted
#: residual has directions above the noise edge; ``none``: quantization alone.
CORRECT_RANKS = ("rmt", "none")


@dataclass
class CompressSettings:
    """All options of a compression run (JSON-serializable)."""

    method: str = "laser"
    threshold: str = "mp"
    threshold_options: dict[str, Any] = field(default_factory=dict)
    mode: str = "factorize"
    select: str = "oneshot"
    score: str = "snr"
    objective: str = "perplexity"
    tolerance: float = 0.02
    target_params: float | None = None
    target_size: int | None = None
    max_changes: int | None = None
    max_candidates: int | None = None
    targets: list[str] | None = None
    include_heads: bool = False
    calibration_windows: int | None = None
    #: A user's calibration text (:meth:`laserrmt.data.sources.TextSource.to_dict`) in place of
    #: the pinned protocol's calibration split; ``compress`` also takes a path or a TextSource.
    calibration_data: dict[str, Any] | None = None
    window: int = 512
    seed: int = 0
    reproduce_laserrmt: bool = False
    whiten: str = "svdllm"
    allocation: str = "global"
    importance: str = "auto"
    fisher_windows: int = 4
    heal_steps: int = 0
    #: Healing's defaults (peak lr, trainable set) won a sweep judged on held-out calibration
    #: windows (benchmarks/results/heal_sweep.md).
    heal_lr: float = 3e-4
    heal_batch_size: int = 1
    heal_top_k: int = HEAL_TOP_K
    #: The healing length in input tokens instead of ``heal_steps`` (one of the two decides).
    heal_tokens: int = 0
    heal_accumulate: int = 1
    heal_params: str = "factors+norms"
    #: The adapters' rank with ``heal_params="factors+norms+lora"`` (``None``: 8).
    heal_lora_rank: int | None = None
    heal_schedule: str = "cosine"
    heal_warmup: float = 0.05
    #: Under ``torchrun``: shard the healed model over the processes with FSDP instead of
    #: replicating it with DDP (for training state that does not fit on one device).
    heal_fsdp: bool = False
    quantize: str | None = None
    #: Budget method: the fraction of each factorized matrix's parameters spent on the largest
    #: entries of its residual (:mod:`laserrmt.surgery.sparse`); 0 keeps plain factors.
    sparse_share: float = 0.0
    correct_rank: str = "rmt"
    #: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``, and ``float32``, ``bfloat16`` or ``float16``:
    #: the model is moved and cast to them once, before anything is measured (``None``: as it is).
    device: str | None = None
    dtype: str | None = None
    #: The budget method, the laser method's one-shot selection or RMT-KD's cuts through the
    #: streaming pipeline (:mod:`laserrmt.sequential`): one block in memory; ``sequential``
    #: refits each block's factors on the compressed model's inputs, ``refine_steps`` optimises
    #: each block towards the dense block's outputs.
    stream: bool = False
    sequential: bool = False
    refine_steps: int = 0

    @property
    def n_calibration_windows(self) -> int:
        """The loop re-measures after every change, so it gets fewer windows by default than the
        one calibration pass of the budget method (16, as in the SVD-LLM baseline)."""
        if self.calibration_windows is not None:
            return self.calibration_windows
        return 16 if self.method == "budget" else 4

    @classmethod
    def reproduce_laserrmt_preset(cls, **overrides: Any) -> CompressSettings:
        """The original laserRMT recipe: IQR noise rule, 15 lowest-SNR candidates, dense
        reconstruction, a change kept only when it strictly improves perplexity."""
        preset = cls(
            threshold="laserrmt",
            mode="denoise",
            select="loop",
            score="snr",
            objective="perplexity",
            tolerance=0.0,
            max_candidates=LASERRMT_CANDIDATES,
            reproduce_laserrmt=True,
        )
        return replace(preset, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidOptionError(
                f"unknown compression settings {unknown}; known: {sorted(known)}"
            )
        return cls(**data)

    @property
    def heals(self) -> bool:
        return self.heal_steps > 0 or self.heal_tokens > 0

    @property
    def n_heal_steps(self) -> int:
        """The healing steps: ``heal_steps``, or as many as ``heal_tokens`` buys."""
        if self.heal_tokens:
            return healing_steps(
                self.heal_tokens,
                window=self.window,
                batch_size=self.heal_batch_size,
                accumulate=self.heal_accumulate,
            )
        return self.heal_steps

    def _validate_healing(self) -> None:
        if self.heal_steps < 0 or self.heal_tokens < 0:
            raise InvalidOptionError("--heal-steps and --heal-tokens must be ≥ 0")
        if self.heal_steps and self.heal_tokens:
            raise InvalidOptionError(
                "--heal-steps and --heal-tokens both set the healing length; give one of them"
            )
        if self.heal_batch_size < 1 or self.heal_top_k < 1 or self.heal_accumulate < 1:
            raise InvalidOptionError(
                "--heal-batch-size, --heal-accumulate and --heal-top-k must be ≥ 1"
            )
        check_healing_options(self.heal_params, self.heal_schedule, self.heal_warmup)
        if self.heal_lora_rank is not None:
            if not self.heal_params.endswith("lora"):
                raise InvalidOptionError(
                    "--heal-lora-rank sizes the adapters of --heal-params factors+norms+lora; "
                    "add that or drop --heal-lora-rank"
                )
            if self.heal_lora_rank < 1:
                raise InvalidOptionError("--heal-lora-rank must be ≥ 1")
        if self.heal_fsdp:
            if not self.heals:
                raise InvalidOptionError(
                    "--heal-fsdp shards the healing steps; add --heal-steps or --heal-tokens"
                )
            require_process_group("--heal-fsdp")

    def validate(self) -> None:
        """Check every option before anything is loaded or measured (one line per mistake)."""
        for option, value, choices in (
            ("method", self.method, METHODS),
            ("select", self.select, SELECTIONS),
            ("threshold", self.threshold, THRESHOLD_METHODS),
            ("estimator", self.threshold_options.get("estimator", "median"), SIGMA_ESTIMATORS),
            ("mode", self.mode, MODES),
            ("score", self.score, tuple(SCORES)),
            ("objective", self.objective, OBJECTIVES),
            ("whiten", self.whiten, WHITEN_METHODS),
            ("allocation", self.allocation, ALLOCATIONS),
            ("importance", self.importance, (*IMPORTANCE_KINDS, "auto")),
            ("correct-rank", self.correct_rank, CORRECT_RANKS),
        ):
            if value not in choices:
                raise InvalidOptionError(
                    f"unknown --{option} {value!r}; choose one of {', '.join(choices)}"
                )
        if self.n_calibration_windows < 1:
            raise InvalidOptionError("--calibration-windows must be at least 1")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise InvalidOptionError(
                f"unknown --quantize {self.quantize!r}; choose one of {', '.join(QUANTIZATIONS)}"
            )
        self._validate_healing()
        if self.quantize in LOWBIT and self.target_size is not None:
            raise InvalidOptionError(
                f"--target-size counts int8 weights only; drop it or use --quantize int8 (not "
                f"{self.quantize})"
            )
        if self.device is not None:
            resolve_device(self.device)
        if self.dtype is not None:
            resolve_dtype(self.dtype)
        if self.heals:
            check_trainable_dtype(self.dtype, "--heal-steps")
        reads_text = self.method != "laser" or self.select == "loop" or self.heals
        if self.calibration_data is not None and not reads_text:
            raise InvalidOptionError(
                "--calibration-data: the laser method's oneshot selection reads no calibration "
                "text; add --select loop, --heal-steps or use --method budget"
            )
        if self.refine_steps < 0:
            raise InvalidOptionError("--refine-steps must be ≥ 0")
        if (self.sequential or self.refine_steps) and not self.stream:
            raise InvalidOptionError(
                "--sequential and --refine-steps work block by block: add --stream"
            )
        if self.stream:
            self._check_streamable()
        check_sparse_share(self.sparse_share)
        if self.sparse_share and self.method != "budget":
            raise InvalidOptionError("--sparse-share applies to --method budget; drop it")
        if self.sparse_share and self.quantize is not None:
            raise InvalidOptionError(
                "--sparse-share with --quantize: int8 does not cover the sparse entries; "
                "drop one of them"
            )
        if self.target_size is not None and self.method != "budget":
            raise InvalidOptionError(
                "--target-size is a budget for --method budget (or --whiten); the laser method "
                "takes --target-params"
            )

    def _check_streamable(self) -> None:
        if self.method == "laser" and self.select == "loop":
            raise InvalidOptionError(
                "--select loop re-evaluates the whole model after each change, which --stream "
                "(one block in memory) cannot; use --select oneshot, or drop --stream"
            )
        unsupported = [
            option
            for option, used in (
                (
                    "--quantize/--sequential/--refine-steps with --method rmt-kd",
                    self.method == "rmt-kd"
                    and (self.quantize is not None or self.sequential or self.refine_steps > 0),
                ),
                ("--target-size", self.target_size is not None),
                (f"--quantize {self.quantize}", self.quantize in LOWBIT),
                ("--heal-steps/--heal-tokens with --quantize", self.heals and bool(self.quantize)),
                (
                    "--sequential/--refine-steps with --method laser",
                    self.method == "laser" and (self.sequential or self.refine_steps > 0),
                ),
                ("--include-heads", self.include_heads),
                ("--importance attention", self.importance == "attention"),
                (
                    "--whiten asvd/fisher with --sequential",
                    self.sequential and self.whiten not in ("svdllm", "none"),
                ),
            )
            if used
        ]
        if unsupported:
            raise InvalidOptionError(
                f"--stream runs the budget, laser and rmt-kd methods block by block and does not "
                f"take {unsupported[0]}; drop it, or drop --stream to compress in memory"
            )
        if self.method == "budget" and self.target_params is None:
            raise InvalidOptionError(
                "--stream needs --target-params F (the fraction of target parameters to remove)"
            )


@dataclass
class CompressionResult:
    """What a compression run decided and did."""

    plan: CompressionPlan
    settings: CompressSettings
    steps: list[LoopStep] = field(default_factory=list)
    objective_reference: float | None = None
    analysis_records: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    healing: dict[str, Any] | None = None
    weight_bytes: int | None = None
    #: Low-bit quantization: each quantized layer's correction rank (0: none).
    corrections: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "plan_summary": {
                "params_before": self.plan.params_before(),
                "params_after": self.plan.params_after(),
                "params_removed": self.plan.params_removed(),
                "modes": self.plan.counts(),
            },
            "objective_reference": self.objective_reference,
            "loop": [s.to_dict() for s in self.steps],
            "healing": self.healing,
            "weight_bytes": self.weight_bytes,
            "corrections": self.corrections,
            "timings": self.timings,
        }


def compress(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    settings: CompressSettings | None = None,
    plan: CompressionPlan | None = None,
    progress: bool = True,
    **overrides: Any,
) -> tuple[nn.Module, CompressionResult]:
    """Compress ``model`` in place and return it with what was decided.

    ``settings`` (or keyword overrides of its fields) choose the method; a saved ``plan`` skips
    the decision and is applied as it is, its factors recomputed as the plan records them
    (whitened ones on the calibration windows it names, whatever this call's seed and window
    counts). Healing and quantization are not part of a plan: they follow ``settings``, so a
    replay with the run's ``heal_steps``, ``heal_lr``, calibration options and ``quantize``
    gives the run's model. ``tokenizer`` is needed by methods that measure on calibration text
    (the loop, budget, healing, and replaying a whitened plan). ``settings.device`` and
    ``settings.dtype`` move and cast ``model`` in place first.
    """
    settings = replace(settings or CompressSettings(), **overrides)
    data = settings.calibration_data
    if isinstance(data, str | os.PathLike):
        data = open_text_source(data)
    if isinstance(data, TextSource):
        settings = replace(settings, calibration_data=data.to_dict())
    settings.validate()
    if settings.method == "rmt-kd":
        raise InvalidOptionError(
            "RMT-KD trains the model and has its own entry point: "
            "laserrmt.methods.rmt_kd.run_rmt_kd(model, tokenizer, task=...)"
        )
    place_model(model, settings.device, settings.dtype)
    result = CompressionResult(CompressionPlan({}), settings)
    if settings.heals:
        # Healing distils from the model as it was: its top-k predictions on the healing
        # batches, taken before any surgery (a few MB where a copy of the model would be GB).
        heal_windows = _healing_windows(tokenizer, settings)
        teacher = healing_teacher(
            model,
            heal_windows,
            batch_size=settings.heal_batch_size,
            top_k=settings.heal_top_k,
        )
    start = time.perf_counter()
    if plan is not None:
        result.plan = plan
        _replay(model, tokenizer, plan, settings.sparse_share, progress)
    elif settings.method == "budget":
        _compress_budget(model, tokenizer, settings, result, progress)
    else:
        _compress_laser(model, tokenizer, settings, result, progress)
    result.timings["decision_and_surgery"] = time.perf_counter() - start
    if settings.heals:
        start = time.perf_counter()
        result.healing = _heal(model, teacher, heal_windows, settings, progress)
        del teacher
        result.timings["healing"] = time.perf_counter() - start
    if settings.quantize == "int8":
        start = time.perf_counter()
        quantize_model_int8(model)
        result.timings["quantization"] = time.perf_counter() - start
    elif settings.quantize in LOWBIT:
        start = time.perf_counter()
        correct = settings.correct_rank == "rmt"
        windows = _calibration_windows(tokenizer, settings) if correct else None
        result.corrections = quantize_model_lowbit(
            model,
            LOWBIT[settings.quantize],
            correct=correct,
            batches=None if windows is None else list(windows.split(1)),
            rule=settings.threshold if settings.threshold in ("mp", "tw", "gd") else "mp",
            progress=progress,
        )
        result.timings["quantization"] = time.perf_counter() - start
    result.weight_bytes = weight_bytes(model)
    return model, result


def _heal(
    model: nn.Module,
    teacher: Sequence[TopKLogits],
    windows: torch.Tensor,
    settings: CompressSettings,
    progress: bool,
) -> dict[str, Any]:
    """:func:`~laserrmt.methods.heal.heal` with the options of ``settings``."""
    return heal(
        model,
        teacher,
        windows,
        steps=settings.n_heal_steps,
        lr=settings.heal_lr,
        batch_size=settings.heal_batch_size,
        accumulate=settings.heal_accumulate,
        params=settings.heal_params,
        lora_rank=settings.heal_lora_rank or LORA_RANK,
        schedule=settings.heal_schedule,
        warmup=settings.heal_warmup,
        seed=settings.seed,
        progress=progress,
        shard=settings.heal_fsdp,
    )


def heal_saved(
    folder: str | os.PathLike[str],
    teacher: Sequence[TopKLogits],
    windows: torch.Tensor,
    settings: CompressSettings,
    *,
    evaluation: torch.Tensor | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], PerplexityResult | None]:
    """Heal the compressed model saved in ``folder`` as :func:`compress` heals in memory, and
    write its weights back over the folder's files (same shards); returns the healing log and
    the healed model's perplexity on ``evaluation``.

    For the streaming pipeline, whose dense model is never whole in memory: ``teacher`` comes
    from :func:`laserrmt.sequential.streamed_teacher` on the healing ``windows``
    (:func:`_healing_windows`), and only the compressed model is loaded, on
    ``settings.device``. Not atomic: ``folder`` is the temporary folder of the output.
    """
    from laserrmt.surgery.io import load

    model, _ = load(folder)
    place_model(model, settings.device, None)  # in the dtype the blocks were written in
    healing = _heal(model, teacher, windows, settings, progress)
    rewrite_weights(folder, model.state_dict())
    after = None
    if evaluation is not None:
        after = perplexity(model, evaluation, progress=progress, desc="perplexity (healed)")
    return healing, after


def _laser_analysis(
    model: nn.Module, settings: CompressSettings, progress: bool, stream: BlockStream | None = None
) -> AnalysisResult:
    """The laser method's weight spectra, every target usable; in memory the singular vectors
    are kept for the surgery, streamed (``model`` is ``stream``'s skeleton) only the values."""
    analysis = analyze_model(
        model,
        targets=settings.targets,
        threshold=settings.threshold,
        threshold_options=settings.threshold_options,
        include_heads=settings.include_heads,
        keep_vectors=stream is None,
        progress=progress,
        stream=stream,
    )
    if analysis.failures:
        names = ", ".join(f.module for f in analysis.failures)
        raise NumericalError(
            f"cannot compress: {len(analysis.failures)} matrices have unusable weights ({names}: "
            f"{analysis.failures[0].reason}); leave them out with --targets"
        )
    return analysis


def _laser_oneshot(analysis: AnalysisResult, settings: CompressSettings) -> CompressionPlan:
    return oneshot_plan(
        analysis,
        mode=settings.mode,
        score=settings.score,
        target_params=settings.target_params,
        settings=settings.to_dict(),
    )


def streamed_laser_plan(
    stream: BlockStream, settings: CompressSettings, progress: bool = True
) -> tuple[CompressionPlan, AnalysisResult]:
    """The laser method's one-shot plan for a streamed model: each target matrix is read from
    the checkpoint for its own SVD and freed (weights only, no calibration text); the plan is
    :func:`~laserrmt.methods.laser.oneshot_plan`'s, as in memory. Its factors are plain SVDs,
    which :func:`~laserrmt.sequential.compress_streaming` recomputes block by block in the cut."""
    from laserrmt.sequential import streamable_targets

    streamable_targets(stream, settings.targets, settings.quantize)  # before any SVD
    analysis = _laser_analysis(stream.model, settings, progress, stream=stream)
    return _laser_oneshot(analysis, settings), analysis


def _compress_laser(
    model: nn.Module,
    tokenizer: Any,
    settings: CompressSettings,
    result: CompressionResult,
    progress: bool,
) -> None:
    analysis = _laser_analysis(model, settings, progress)
    result.analysis_records = analysis.records
    if settings.select == "oneshot":
        result.plan = _laser_oneshot(analysis, settings)
        apply_plan(model, result.plan, svd_cache=analysis.svd_cache(), progress=progress)
        return
    objective = make_objective(
        settings.objective,
        _calibration_windows(tokenizer, settings),
        settings.tolerance,
        strict=settings.reproduce_laserrmt,
    )
    outcome = laser_loop(
        model,
        analysis,
        objective,
        mode=settings.mode,
        score=settings.score,
        target_params=settings.target_params,
        max_changes=settings.max_changes,
        max_candidates=settings.max_candidates,
        settings=settings.to_dict(),
        progress=progress,
    )
    result.plan, result.steps, result.objective_reference = (
        outcome.plan,
        outcome.steps,
        outcome.reference,
    )


def _compress_budget(
    model: nn.Module,
    tokenizer: Any,
    settings: CompressSettings,
    result: CompressionResult,
    progress: bool,
) -> None:
    targets = select_targets(
        find_targets(model, include_heads=settings.include_heads), settings.targets
    )
    windows = _calibration_windows(tokenizer, settings)
    # The outcome owns a temporary folder of spilled factors: removed on leaving, also on error.
    with budget_plan(
        model,
        targets,
        windows,
        calibration_source=_calibration_record(settings),
        target_params=settings.target_params,
        target_bytes=settings.target_size,
        quantize=settings.quantize,
        whiten=settings.whiten,
        allocation=settings.allocation,
        importance=settings.importance,
        fisher_windows=settings.fisher_windows,
        settings=settings.to_dict(),
        progress=progress,
    ) as outcome:
        _cut(model, outcome.plan, outcome.svd_cache, windows, settings.sparse_share, progress)
    result.plan = outcome.plan


def _cut(
    model: nn.Module,
    plan: CompressionPlan,
    svd_cache: Any,
    windows: Any,
    sparse_share: float,
    progress: bool,
) -> None:
    """Apply ``plan``; with a sparse share, factorized layers become low rank plus sparse, their
    residual entries weighted by the input Gram's diagonal on ``windows`` when the plan's
    factors were whitened by the Gram (``svdllm``, ``asvd``), unweighted otherwise."""
    if not sparse_share:
        apply_plan(model, plan, svd_cache=svd_cache, progress=progress)
        return
    diagonals = {}
    if windows is not None and plan.factors.whiten in ("svdllm", "asvd"):
        names = [d.module for d in plan if d.mode == "factorize"]
        diagonals = input_gram_diagonals(model, names, windows.split(1), progress)
    factorizer = sparse_factorizer(sparse_share, diagonals)
    apply_plan(model, plan, svd_cache=svd_cache, progress=progress, factorizer=factorizer)


def _replay(
    model: nn.Module,
    tokenizer: Any,
    plan: CompressionPlan,
    sparse_share: float,
    progress: bool,
) -> None:
    """Apply a saved plan with the factors it was made with: whitened factors are recomputed on
    the calibration windows the plan names (the seed and counts of this call do not matter)."""
    factors = plan.factors
    if not factors.needs_calibration:
        _cut(model, plan, None, None, sparse_share, progress)
        return
    problem = factors.missing()
    if problem:
        raise PlanError(problem)
    record = factors.calibration or {}
    known = (CALIBRATION_SOURCE, USER_CALIBRATION_SOURCE)
    if record["source"] not in known or (
        record["source"] == USER_CALIBRATION_SOURCE and not isinstance(record.get("data"), dict)
    ):
        raise PlanError(
            f"the plan's factors were computed on calibration source {record['source']!r}, "
            f"which this laserrmt cannot read (it knows {' and '.join(map(repr, known))})"
        )
    recorded = CompressSettings(
        calibration_windows=record["n_windows"],
        window=record["window"],
        seed=record["seed"],
        calibration_data=record.get("data"),
    )
    windows = _calibration_windows(tokenizer, recorded)
    with replay_factors(model, plan, windows, progress=progress) as cache:
        _cut(model, plan, cache, windows, sparse_share, progress)


def _calibration_record(settings: CompressSettings) -> dict[str, Any]:
    """Where the calibration windows come from, as a plan records them for a replay."""
    record: dict[str, Any] = {
        "source": CALIBRATION_SOURCE,
        "n_windows": settings.n_calibration_windows,
        "window": settings.window,
        "seed": settings.seed,
    }
    if settings.calibration_data is not None:
        record.update(source=USER_CALIBRATION_SOURCE, data=dict(settings.calibration_data))
    return record


def _healing_windows(tokenizer: Any, settings: CompressSettings) -> Any:
    """The windows healing reads: as many as its steps visit, drawn with the seed from the
    calibration source (never evaluation text), all of them when the source holds fewer (the
    steps then pass over them again)."""
    needed = settings.n_heal_steps * settings.heal_accumulate * settings.heal_batch_size
    return _calibration_windows(
        tokenizer, replace(settings, calibration_windows=needed), at_most=True
    )


def _calibration_windows(tokenizer: Any, settings: CompressSettings, at_most: bool = False) -> Any:
    from laserrmt.data.text import calibration_windows

    if tokenizer is None:
        raise InvalidOptionError(
            "this method measures the model on calibration text and needs its tokenizer; "
            "pass tokenizer= (the CLI loads it with the model)"
        )
    if settings.calibration_data is not None:
        return TextSource.from_dict(settings.calibration_data).windows(
            tokenizer,
            n_windows=settings.n_calibration_windows,
            window=settings.window,
            seed=settings.seed,
            at_most=at_most,
        )
    return calibration_windows(
        tokenizer,
        n_windows=settings.n_calibration_windows,
        window=settings.window,
        seed=settings.seed,
        at_most=at_most,
    )
