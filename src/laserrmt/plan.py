"""The decision value: which weight matrix gets which rank, and what is done with it.

A :class:`CompressionPlan` maps full module names to a :class:`ModuleDecision`. It is the arrow
between statistics and surgery: methods produce it, :func:`laserrmt.surgery.apply.apply_plan`
applies it, and in between it can be printed, saved as JSON, edited by hand and loaded again.

Every weight is seen as an ``m × n`` (out × in) matrix. Three modes exist:

``factorize``
    Replace the layer by two factors ``A`` (m × k) and ``B`` (k × n): ``k(m + n)`` parameters.
``denoise``
    Replace the weight in place by its rank-k truncation (LASER, Sharma et al., ICLR 2024;
    laserRMT): the spectrum beyond k is removed but the matrix stays dense, so ``m·n``
    parameters remain.
``keep``
    Leave the matrix alone.

A rank fixes a plain truncated SVD, but not an activation-aware one (SVD-LLM, ASVD, FWSVD), whose
factors come from calibration statistics: the plan's :class:`FactorSource` records how they are
computed, so that a saved plan rebuilds the same model or refuses to.

Factorizing pays only when ``k(m + n) < m·n``, i.e. ``k < m·n / (m + n)``
(see :func:`factorize_pays`); :func:`resolve_mode` turns a requested mode into the one that
makes sense for a given rank and says why.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from laserrmt.errors import PlanError

Mode = Literal["factorize", "denoise", "keep"]
MODES: tuple[str, ...] = get_args(Mode)

#: Version of the JSON layout written by :meth:`CompressionPlan.save`.
PLAN_FORMAT_VERSION = 1


def factorize_pays(shape: tuple[int, int], rank: int) -> bool:
    """Whether storing a rank-``rank`` factorization of an ``m × n`` matrix saves parameters.

    Two factors hold ``k(m + n)`` numbers against ``m·n`` for the dense matrix, so the factorization
    is smaller exactly when ``k < m·n / (m + n)`` (checked in integers to avoid rounding).
    """
    m, n = _checked_shape(shape)
    return rank * (m + n) < m * n


def resolve_mode(
    shape: tuple[int, int],
    rank: int,
    requested_mode: str,
    *,
    fallback: Literal["denoise", "keep"] = "keep",
) -> tuple[Mode, str]:
    """Return the mode to use for a matrix of ``shape`` truncated to ``rank``, and why.

    The rule, in order:

    1. ``rank >= min(m, n)`` (full rank): ``keep``; truncating to full rank changes nothing.
    2. ``requested_mode == "keep"``: ``keep``.
    3. ``requested_mode == "denoise"``: ``denoise``.
    4. ``requested_mode == "factorize"`` and :func:`factorize_pays`: ``factorize``.
    5. ``requested_mode == "factorize"`` but the two factors would not be smaller than the dense
       matrix: ``fallback``. The default ``"keep"`` leaves the matrix alone, since a requested
       factorization means "save parameters" and denoising saves none while still changing the
       weight; ``fallback="denoise"`` applies the LASER-style dense truncation instead.

    Raises:
        PlanError: ``rank`` below 1 or above ``min(m, n)``, or an unknown mode or fallback.
    """
    m, n = _checked_shape(shape)
    rank_full = min(m, n)
    rank = _plain_int(rank)
    if requested_mode not in MODES:
        raise PlanError(f"unknown mode {requested_mode!r}; use one of {', '.join(MODES)}")
    if fallback not in ("denoise", "keep"):
        raise PlanError(f"unknown fallback {fallback!r}; use 'denoise' or 'keep'")
    if not _is_int(rank) or not 1 <= rank <= rank_full:
        raise PlanError(f"rank {rank!r} is outside 1..{rank_full} for a {m}×{n} matrix")
    if rank == rank_full:
        return "keep", f"rank {rank} is full rank for {m}×{n}: nothing to remove"
    if requested_mode == "keep":
        return "keep", "kept as requested"
    if requested_mode == "denoise":
        return "denoise", f"denoised to rank {rank} of {rank_full} as requested"
    if factorize_pays((m, n), rank):
        return "factorize", f"factorized: {rank * (m + n)} parameters instead of {m * n}"
    why = (
        f"factorizing at rank {rank} would store {rank * (m + n)} ≥ {m * n} parameters "
        f"(pays only below rank {_break_even_rank(m, n)})"
    )
    if fallback == "denoise":
        return "denoise", f"{why}; denoised densely instead"
    return "keep", f"{why}; kept dense"


@dataclass
class ModuleDecision:
    """What happens to one weight matrix.

    Attributes:
        module: full dotted name from ``model.named_modules()``.
        shape: ``(m, n)`` = (out, in) of the weight seen as a matrix (convolution kernels as
            out × in·kh·kw; HF ``Conv1D`` transposed to out × in).
        rank_full: ``min(m, n)``.
        rank: rank kept; for ``keep`` it is informational (for example the rank a method found).
        mode: ``"factorize"``, ``"denoise"`` or ``"keep"``.
        reason: one line saying why, for people reading the plan.
        extras: method-specific JSON-serializable values (noise level, threshold, SNR...).
    """

    module: str
    shape: tuple[int, int]
    rank_full: int
    rank: int
    mode: Mode
    reason: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # numpy integers arrive from the statistics code; store plain ints so JSON stays clean.
        self.rank = _plain_int(self.rank)
        self.rank_full = _plain_int(self.rank_full)
        if isinstance(self.shape, tuple | list):
            self.shape = tuple(_plain_int(v) for v in self.shape)
        if not isinstance(self.module, str) or not self.module:
            raise PlanError(f"module name {self.module!r} is not a non-empty string")
        try:
            self.shape = _checked_shape(self.shape)
        except PlanError as exc:
            raise PlanError(f"module {self.module}: {exc}") from None
        m, n = self.shape
        if self.mode not in MODES:
            raise PlanError(
                f"module {self.module}: unknown mode {self.mode!r}; use one of {', '.join(MODES)}"
            )
        if not _is_int(self.rank_full) or self.rank_full != min(m, n):
            raise PlanError(
                f"module {self.module}: rank_full is {self.rank_full!r} but a {m}×{n} matrix has "
                f"full rank {min(m, n)}; set rank_full to {min(m, n)}"
            )
        if not _is_int(self.rank):
            raise PlanError(f"module {self.module}: rank {self.rank!r} is not an integer")
        low = 0 if self.mode == "keep" else 1
        if not low <= self.rank <= self.rank_full:
            raise PlanError(
                f"module {self.module}: rank {self.rank} is outside {low}..{self.rank_full} "
                f"for mode {self.mode!r}"
            )
        if not isinstance(self.extras, dict):
            raise PlanError(f"module {self.module}: extras must be a JSON object")

    @property
    def params_before(self) -> int:
        """Parameters of the dense weight matrix, ``m·n``."""
        m, n = self.shape
        return m * n

    @property
    def params_after(self) -> int:
        """Parameters once the decision is applied: ``k(m + n)`` when factorized, else ``m·n``."""
        m, n = self.shape
        return self.rank * (m + n) if self.mode == "factorize" else m * n

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (without ``module``, which is the key in the plan)."""
        return {
            "shape": list(self.shape),
            "rank_full": self.rank_full,
            "rank": self.rank,
            "mode": self.mode,
            "reason": self.reason,
            "extras": dict(self.extras),
        }

    @classmethod
    def from_dict(cls, module: str, data: Mapping[str, Any]) -> ModuleDecision:
        """Build and validate a decision from :meth:`to_dict` output (or a hand-edited copy)."""
        if not isinstance(data, Mapping):
            raise PlanError(f"module {module}: expected a JSON object, got {type(data).__name__}")
        missing = [key for key in ("shape", "rank", "mode") if key not in data]
        if missing:
            raise PlanError(f"module {module}: missing field(s) {', '.join(missing)}")
        known = {"shape", "rank_full", "rank", "mode", "reason", "extras"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(
                f"module {module}: unknown field(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        shape = data["shape"]
        if not isinstance(shape, list | tuple):
            raise PlanError(f"module {module}: shape must be a list [m, n], got {shape!r}")
        shape_t = tuple(shape)
        rank_full: Any = data.get("rank_full")
        if rank_full is None and len(shape_t) == 2 and all(_is_int(v) for v in shape_t):
            rank_full = min(shape_t)
        return cls(
            module=module,
            shape=shape_t,  # validated in __post_init__
            rank_full=rank_full,
            rank=data["rank"],
            mode=data["mode"],
            reason=str(data.get("reason", "")),
            extras=data.get("extras", {}),
        )


#: Fields a calibration record needs for a replay to draw the same windows again.
CALIBRATION_FIELDS = ("source", "n_windows", "window", "seed", "tokens_sha256")


@dataclass(frozen=True)
class FactorSource:
    """How the factors of a plan's ``factorize`` and ``denoise`` decisions are computed.

    The rank alone does not fix a truncation: an activation-aware method (SVD-LLM, ASVD, FWSVD;
    :mod:`laserrmt.surgery.whiten`) truncates a weighted SVD whose weights come from calibration
    data. A plan records that data's source, so that replaying the plan recomputes the same
    statistics and rebuilds the same model, or refuses (:meth:`missing`).

    Attributes:
        whiten: ``"none"`` (plain SVD of the weight, needs nothing) or the whitening method.
        floor: the relative floor the whitening ran with.
        calibration: where the calibration windows came from: ``source`` (a name a replay
            knows how to read), ``n_windows``, ``window``, ``seed`` and ``tokens_sha256`` (of
            the windows' token ids, which a replay checks: another tokenizer gives other
            windows); for a user's text, ``data`` (its ``TextSource`` record with the content
            SHA-256). ``None`` when the factors need no data or their data cannot be named.
        fisher_windows: with ``whiten="fisher"``, how many of the windows gave the Fisher.
    """

    whiten: str = "none"
    floor: float | None = None
    calibration: dict[str, Any] | None = None
    fisher_windows: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.whiten, str) or not self.whiten:
            raise PlanError(f"factors: whiten {self.whiten!r} is not a method name")
        if self.floor is not None and (
            isinstance(self.floor, bool)
            or not isinstance(self.floor, int | float)
            or not 0 < self.floor < 1
        ):
            raise PlanError(f"factors: floor {self.floor!r} is not a number in (0, 1)")
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise PlanError("factors: calibration must be a JSON object")
        if self.fisher_windows is not None and not (
            _is_int(self.fisher_windows) and self.fisher_windows >= 1
        ):
            raise PlanError(f"factors: fisher_windows {self.fisher_windows!r} is not a count ≥ 1")

    @property
    def needs_calibration(self) -> bool:
        return self.whiten != "none"

    def missing(self) -> str | None:
        """Why a replay cannot recompute these factors (one line), or ``None`` when it can."""
        if not self.needs_calibration:
            return None
        what = f"factors whitened with {self.whiten!r}"
        if self.calibration is None:
            return (
                f"the plan's {what} do not record the calibration data they were computed on; "
                "regenerate the plan with laserrmt compress"
            )
        absent = [key for key in CALIBRATION_FIELDS if key not in self.calibration]
        if self.floor is None:
            absent.append("floor")
        if self.whiten == "fisher" and self.fisher_windows is None:
            absent.append("fisher_windows")
        if absent:
            return (
                f"the plan's {what} lack {', '.join(absent)} of their calibration record; "
                "regenerate the plan with laserrmt compress"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "whiten": self.whiten,
            "floor": self.floor,
            "calibration": None if self.calibration is None else dict(self.calibration),
            "fisher_windows": self.fisher_windows,
        }

    @classmethod
    def from_dict(cls, data: Any) -> FactorSource:
        if not isinstance(data, Mapping):
            raise PlanError(f"plan 'factors' must be a JSON object, got {type(data).__name__}")
        known = {"whiten", "floor", "calibration", "fisher_windows"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(
                f"plan 'factors' has unknown field(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        calibration = data.get("calibration")
        return cls(
            whiten=data.get("whiten", "none"),
            floor=data.get("floor"),
            calibration=dict(calibration) if isinstance(calibration, Mapping) else calibration,
            fisher_windows=data.get("fisher_windows"),
        )

    @classmethod
    def inferred(cls, decisions: Iterable[ModuleDecision]) -> FactorSource:
        """For a plan saved without ``factors``: plain SVD, unless a decision says its factors
        were whitened (budget plans of laserrmt ≤ 0.1 record it in their extras); then a source
        without calibration, which :meth:`missing` refuses rather than replaying plain SVD."""
        for decision in decisions:
            whiten = decision.extras.get("whiten", "none")
            if decision.mode != "keep" and whiten != "none":
                return cls(whiten=str(whiten))
        return cls()


@dataclass
class CompressionPlan:
    """An ordered mapping from module name to :class:`ModuleDecision`, with its provenance.

    Attributes:
        decisions: module name → decision, in application order.
        method: the method that produced the plan (``"laser"``, ``"budget"``, ``"manual"``...).
        settings: the options it ran with (JSON-serializable).
        factors: how the factors are computed (plain SVD unless a method whitened them).
    """

    decisions: dict[str, ModuleDecision]
    method: str = "manual"
    settings: dict[str, Any] = field(default_factory=dict)
    factors: FactorSource = field(default_factory=FactorSource)

    def __post_init__(self) -> None:
        for name, decision in self.decisions.items():
            if name != decision.module:
                raise PlanError(
                    f"plan key {name!r} names a decision for module {decision.module!r}"
                )

    @classmethod
    def from_decisions(
        cls,
        decisions: Iterable[ModuleDecision],
        method: str = "manual",
        settings: Mapping[str, Any] | None = None,
        factors: FactorSource | None = None,
    ) -> CompressionPlan:
        """Build a plan from decisions in order; a module named twice is an error."""
        ordered: dict[str, ModuleDecision] = {}
        for decision in decisions:
            if decision.module in ordered:
                raise PlanError(f"module {decision.module} appears twice in the plan")
            ordered[decision.module] = decision
        return cls(ordered, method, dict(settings or {}), factors or FactorSource())

    def __len__(self) -> int:
        return len(self.decisions)

    def __iter__(self) -> Iterator[ModuleDecision]:
        return iter(self.decisions.values())

    def __getitem__(self, module: str) -> ModuleDecision:
        return self.decisions[module]

    def params_before(self) -> int:
        """Parameters of all planned matrices before the plan is applied."""
        return sum(d.params_before for d in self.decisions.values())

    def params_after(self) -> int:
        """Parameters of all planned matrices after: ``k(m + n)`` if factorized, else ``m·n``."""
        return sum(d.params_after for d in self.decisions.values())

    def params_removed(self) -> int:
        """``params_before() - params_after()``; negative when a factorization does not pay."""
        return self.params_before() - self.params_after()

    def counts(self) -> dict[str, int]:
        """How many modules each mode has."""
        return {mode: sum(d.mode == mode for d in self.decisions.values()) for mode in MODES}

    def summary(self) -> list[dict[str, Any]]:
        """One row per module, ready for a table: name, shape, ranks, mode, parameters, reason."""
        return [
            {
                "module": d.module,
                "shape": f"{d.shape[0]}×{d.shape[1]}",
                "rank": d.rank,
                "rank_full": d.rank_full,
                "mode": d.mode,
                "params_before": d.params_before,
                "params_after": d.params_after,
                "reason": d.reason,
            }
            for d in self.decisions.values()
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping; modules keep their order."""
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "method": self.method,
            "settings": dict(self.settings),
            "factors": self.factors.to_dict(),
            "modules": {name: d.to_dict() for name, d in self.decisions.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPlan:
        """Build and validate a plan from :meth:`to_dict` output (or a hand-edited copy)."""
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        if version != PLAN_FORMAT_VERSION:
            raise PlanError(
                f"plan format_version {version!r} is not supported (this laserrmt reads "
                f"{PLAN_FORMAT_VERSION}); regenerate the plan with this version"
            )
        modules = data.get("modules")
        if not isinstance(modules, Mapping):
            raise PlanError("plan has no 'modules' object mapping module names to decisions")
        settings = data.get("settings", {})
        if not isinstance(settings, Mapping):
            raise PlanError("plan 'settings' must be a JSON object")
        decisions = {name: ModuleDecision.from_dict(name, d) for name, d in modules.items()}
        factors = (
            FactorSource.from_dict(data["factors"])
            if "factors" in data
            else FactorSource.inferred(decisions.values())
        )
        return cls(decisions, str(data.get("method", "manual")), dict(settings), factors)

    def to_json(self) -> str:
        """Readable JSON (indent 2, UTF-8 characters kept) for saving and editing by hand."""
        try:
            return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=_json_default)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"plan cannot be written as JSON: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON atomically (temporary file in the same folder, then rename)."""
        from laserrmt.outputs import write_text_atomic

        return write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CompressionPlan:
        """Read and validate a plan written by :meth:`save` (or edited by hand)."""
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PlanError(f"plan file {source} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"plan file {source} cannot be read: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"plan file {source} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                f"{exc.msg}); fix the file or regenerate it"
            ) from None
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"plan file {source}: {exc}") from None


def _break_even_rank(m: int, n: int) -> int:
    """Smallest rank at which factorizing no longer pays: ceil(m·n / (m + n))."""
    return -(-m * n // (m + n))


def _plain_int(value: Any) -> Any:
    """``value`` as a Python int when it is an integer of any kind (numpy included), else as is."""
    if isinstance(value, bool | float):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_shape(shape: object) -> tuple[int, int]:
    if isinstance(shape, tuple | list):
        shape = tuple(_plain_int(v) for v in shape)
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 2
        or not all(_is_int(v) and v >= 1 for v in shape)
    ):
        raise PlanError(f"shape {shape!r} is not a pair of positive integers (m, n)")
    return int(shape[0]), int(shape[1])


def _json_default(value: object) -> Any:
    # numpy scalars and arrays (thresholds, noise levels) reach extras/settings from the RMT code.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


# ---------------------------------------------------------------------------------------------
# Width decisions

#: Version of the JSON layout written by :meth:`WidthPlan.save`.
WIDTH_PLAN_FORMAT_VERSION = 1

_UNIT_KINDS = ("mlp", "channels")
_WIDTH_KINDS = ("mlp", "channels", "attn_vo", "attn_qk", "residual")


@dataclass
class WidthDecision:
    """How wide one hidden width stays.

    Attributes:
        site: the site's name (see :func:`laserrmt.models.widths.find_width_sites`).
        kind: ``"mlp"``, ``"channels"``, ``"attn_vo"``, ``"attn_qk"`` or ``"residual"``.
        width: the width before the cut.
        kept_width: the width after it (attention: heads × the per-head width).
        producers, followers, consumer: the modules of the site (see ``WidthSite``).
        kept: the kept units of an ``mlp`` or ``channels`` site (sorted); ``None`` for sites
            that keep *directions*, which the replay recomputes from statistics.
        reason: one line for people reading the plan.
        extras: method-specific JSON-serializable values (noise level, MP edge...).
    """

    site: str
    kind: str
    width: int
    kept_width: int
    producers: tuple[str, ...] = ()
    followers: tuple[str, ...] = ()
    consumer: str = ""
    kept: list[int] | None = None
    reason: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise PlanError(f"width site name {self.site!r} is not a non-empty string")
        where = f"width site {self.site}"
        if self.kind not in _WIDTH_KINDS:
            raise PlanError(f"{where}: unknown kind {self.kind!r}; use {', '.join(_WIDTH_KINDS)}")
        self.width, self.kept_width = _plain_int(self.width), _plain_int(self.kept_width)
        if not (_is_int(self.width) and _is_int(self.kept_width)):
            raise PlanError(f"{where}: width and kept_width must be integers")
        if not 1 <= self.kept_width <= self.width:
            raise PlanError(
                f"{where}: kept_width {self.kept_width} is outside 1..{self.width} (its width)"
            )
        self.producers, self.followers = tuple(self.producers), tuple(self.followers)
        if self.kind != "residual" and (not self.producers or not self.consumer):
            raise PlanError(f"{where}: a {self.kind} site names its producers and consumer")
        if self.kind in _UNIT_KINDS:
            kept = [_plain_int(u) for u in (self.kept or [])]
            if (
                len(kept) != self.kept_width
                or len(set(kept)) != len(kept)
                or not all(_is_int(u) and 0 <= u < self.width for u in kept)
            ):
                raise PlanError(
                    f"{where}: 'kept' must list {self.kept_width} distinct units below {self.width}"
                )
            self.kept = sorted(kept)
        elif self.kept is not None:
            raise PlanError(f"{where}: a {self.kind} site keeps directions, not units; drop 'kept'")
        if not isinstance(self.extras, dict):
            raise PlanError(f"{where}: extras must be a JSON object")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {
            "site": self.site,
            "kind": self.kind,
            "width": self.width,
            "kept_width": self.kept_width,
            "producers": list(self.producers),
            "followers": list(self.followers),
            "consumer": self.consumer,
            "kept": None if self.kept is None else list(self.kept),
            "reason": self.reason,
            "extras": dict(self.extras),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WidthDecision:
        """Build and validate a decision from :meth:`to_dict` output (or a hand-edited copy)."""
        if not isinstance(data, Mapping):
            raise PlanError(f"a width decision must be a JSON object, got {type(data).__name__}")
        name = data.get("site", "?")
        missing = [key for key in ("site", "kind", "width", "kept_width") if key not in data]
        if missing:
            raise PlanError(f"width site {name}: missing field(s) {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(
                f"width site {name}: unknown field(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        for key in ("producers", "followers"):
            if not isinstance(data.get(key, []), list | tuple):
                raise PlanError(f"width site {name}: {key} must be a list of module names")
        kept = data.get("kept")
        if kept is not None and not isinstance(kept, list | tuple):
            raise PlanError(f"width site {name}: kept must be a list of unit indices or null")
        return cls(
            site=data["site"],
            kind=data["kind"],
            width=data["width"],
            kept_width=data["kept_width"],
            producers=tuple(str(p) for p in data.get("producers", ())),
            followers=tuple(str(p) for p in data.get("followers", ())),
            consumer=str(data.get("consumer", "")),
            kept=None if kept is None else list(kept),
            reason=str(data.get("reason", "")),
            extras=data.get("extras", {}),
        )


@dataclass
class WidthPlan:
    """An ordered list of :class:`WidthDecision`: the width decision of a run, replayable.

    The cuts are applied in order, each on the model the earlier ones left, by
    :func:`laserrmt.surgery.apply.apply_plan` (``calibration=`` the batches the plan was made
    with). Where a cut keeps directions rather than units, and for the reconstruction of the
    dropped units, the replay recomputes what it needs from activation statistics of those
    batches; ``calibration`` holds their ``fingerprint`` (and, from the RMT-KD pipeline, how to
    rebuild them: task, dataset, windows, seed), so a replay on other data is refused.

    Attributes:
        decisions: in application order.
        method: the method that produced the plan (``"rmt-kd"``, ``"manual"``...).
        settings: the options it ran with.
        calibration: ``fingerprint`` of the calibration batches, and optionally their recipe.
        trained: empty when the cuts alone made the run's model; otherwise why not (the run
            distilled or fine-tuned weights, which a plan does not hold): replay is refused.
    """

    decisions: list[WidthDecision]
    method: str = "manual"
    settings: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    trained: str = ""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for decision in self.decisions:
            if decision.site in seen:
                raise PlanError(f"width site {decision.site} appears twice in the plan")
            seen.add(decision.site)

    def __len__(self) -> int:
        return len(self.decisions)

    def __iter__(self) -> Iterator[WidthDecision]:
        return iter(self.decisions)

    def check_replayable(self) -> None:
        """Raise :class:`PlanError` when the cuts alone do not rebuild the run's model."""
        if self.trained:
            raise PlanError(
                f"this width plan cannot rebuild its model: {self.trained}; load the saved "
                "model folder instead, or make the plan without training (--steps-per-cut 0)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping; ``"kind": "width"`` tells it from a :class:`CompressionPlan`."""
        return {
            "format_version": WIDTH_PLAN_FORMAT_VERSION,
            "kind": "width",
            "method": self.method,
            "settings": dict(self.settings),
            "calibration": dict(self.calibration),
            "trained": self.trained,
            "sites": [d.to_dict() for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WidthPlan:
        """Build and validate a plan from :meth:`to_dict` output (or a hand-edited copy)."""
        if not isinstance(data, Mapping):
            raise PlanError(f"a width plan must be a JSON object, got {type(data).__name__}")
        if data.get("kind") != "width":
            raise PlanError('not a width plan: it lacks "kind": "width"')
        version = data.get("format_version")
        if version != WIDTH_PLAN_FORMAT_VERSION:
            raise PlanError(
                f"width plan format_version {version!r} is not supported (this laserrmt reads "
                f"{WIDTH_PLAN_FORMAT_VERSION}); regenerate the plan with this version"
            )
        sites = data.get("sites")
        if not isinstance(sites, list):
            raise PlanError("width plan has no 'sites' list")
        for key in ("settings", "calibration"):
            if not isinstance(data.get(key, {}), Mapping):
                raise PlanError(f"width plan '{key}' must be a JSON object")
        return cls(
            [WidthDecision.from_dict(d) for d in sites],
            str(data.get("method", "manual")),
            dict(data.get("settings", {})),
            dict(data.get("calibration", {})),
            str(data.get("trained", "")),
        )

    def to_json(self) -> str:
        """Readable JSON (indent 2) for saving and editing by hand."""
        try:
            return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=_json_default)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"width plan cannot be written as JSON: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON atomically."""
        from laserrmt.outputs import write_text_atomic

        return write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WidthPlan:
        """Read and validate a plan written by :meth:`save` (or edited by hand)."""
        plan = load_plan(path)
        if not isinstance(plan, WidthPlan):
            raise PlanError(f"plan file {path} holds a rank plan, not a width plan")
        return plan


def load_plan(path: str | os.PathLike[str]) -> CompressionPlan | WidthPlan:
    """Read a saved plan of either kind: a :class:`WidthPlan` when it says ``"kind": "width"``,
    else a :class:`CompressionPlan`."""
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"plan file {source} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"plan file {source} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise PlanError(
            f"plan file {source} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}); fix the file or regenerate it"
        ) from None
    if isinstance(data, Mapping) and data.get("kind") == "width":
        try:
            return WidthPlan.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"plan file {source}: {exc}") from None
    return CompressionPlan.load(source)
