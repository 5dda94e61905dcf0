"""Factorization in the activation space: truncate where the layer's *outputs* lose least.

Plain truncated SVD minimises ``‖W − W′‖_F``, which treats every input direction as equally
used. The layer only ever sees its inputs ``X`` (rows = samples, ``G = XᵀX``), so what matters
is the output error ``‖X Wᵀ − X W′ᵀ‖_F``. Each method below rewrites ``W`` as a *weighted*
matrix ``M = L W R`` whose plain SVD is optimal for that method's error, then undoes the
weighting on the singular vectors. The result is always a generalised SVD ``W = U diag(s) Vh``
(:class:`WeightedSVD`) whose top-k triplets give the best rank-k approximation in the
method's norm, with error ``Σ_{i>k} s_i²``:

``none``
    ``M = W``: plain SVD (Eckart–Young).
``svdllm``
    ``M = W S`` with ``S Sᵀ = G`` (SVD-LLM, Wang et al., ICLR 2025). Since
    ``‖(W − W′) S‖_F² = tr((W − W′) G (W − W′)ᵀ) = ‖X (W − W′)ᵀ‖_F²``, truncating the SVD
    of ``W S`` is optimal in output error on the calibration inputs, and that error is exactly
    ``Σ_{i>k} σ_i²``. SVD-LLM takes ``S`` from a Cholesky factorization, which fails on real
    models (the Gram is rank-deficient or badly conditioned: condition numbers up to 5e10 on
    SmolLM2). Here ``S`` comes from the symmetric eigendecomposition ``G = Q Λ Qᵀ`` with the
    eigenvalues floored at ``floor · λ_max`` (:func:`whitening_factor`), which cannot fail; the
    floor used and the number of clamped eigenvalues are reported. ``S = Q Λ^{1/2}`` is the
    eigenvector form of SVD-LLM V2's (Wang et al., NAACL 2025) two-SVD construction.
``asvd``
    ``M = W D`` with ``D = diag(scale_j^α)``, α = 0.5, ``scale_j`` the mean absolute input of
    channel j (ASVD, Yuan et al., 2023). Calibration statistics hold the Gram, not mean ``|x|``,
    so when ``input_abs_mean`` is not given the scale is the channel RMS ``sqrt(G_jj / n)``.
    The two agree up to one constant for zero-mean Gaussian channels
    (``E|x| = sqrt(2/π)·RMS``), and a constant does not change the factors; they differ on
    heavy-tailed channels, where RMS weights outliers more.
``fisher``
    ``M = diag(√Î) W`` with row importance ``Î_i = Σ_j F_ij``, the summed diagonal Fisher
    information of row i (FWSVD, Hsu et al., ICLR 2022); the left factor is divided back by
    ``√Î``.

Everything is computed in float64; factors are cast back to the weight's dtype and device.
Weights (``Λ``, ``scale``, ``Î``) that vanish are floored at ``floor`` times their largest
value, never replaced by something else, and the count is reported in the returned info.

When ``n_samples`` is given the Gram is divided by it, so ``S Sᵀ = G / n``: the spectrum of
``W S`` is then in the units of one sample's output, ``Σ_{i>k} σ_i²`` is the *mean* squared
output error per sample, and spectra of matrices calibrated on different numbers of samples
(convolutions see more positions than tokens) are comparable. The factors are the same either
way; only the scale of the spectrum changes.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.models.placement import float64_device

if TYPE_CHECKING:  # the RMT package is imported lazily by free_rank
    from laserrmt.rmt.thresholds import RankChoice

__all__ = [
    "ASVD_ALPHA",
    "DEFAULT_FLOOR",
    "WHITEN_METHODS",
    "SharedWhitening",
    "WeightedSVD",
    "WhitenMethod",
    "Whitening",
    "activation_aware_factors",
    "compensated_svd",
    "free_rank",
    "weighted_spectrum",
    "weighted_svd",
    "whitened_svd",
    "whitening_factor",
]

WhitenMethod = Literal["none", "asvd", "svdllm", "fisher"]
WHITEN_METHODS: tuple[str, ...] = get_args(WhitenMethod)

#: Relative floor for the eigenvalues of the Gram (and for ASVD scales and Fisher row weights):
#: values below ``DEFAULT_FLOOR · max`` are raised to it. Directions of the input space the
#: calibration data hardly visits then count as if they carried ``1e-8`` of the strongest
#: direction's energy, which changes the output error by at most that fraction while keeping
#: ``S⁻¹`` within a condition number of 1e4 (so factors stay accurate after a float32 cast).
DEFAULT_FLOOR = 1e-8

#: ASVD's exponent on the per-channel input scale (Yuan et al. found 0.5 best).
ASVD_ALPHA = 0.5


@dataclass(frozen=True)
class Whitening:
    """A factor ``S`` of a Gram matrix, ``S Sᵀ = G`` up to the eigenvalue floor, and its inverse.

    Attributes:
        S: float64 ``n × n``, ``Q Λ^{1/2}`` with ``Λ`` floored.
        S_inv: float64 ``n × n``, ``Λ^{-1/2} Qᵀ`` (exactly ``S⁻¹``).
        floor_used: the absolute eigenvalue floor, ``floor · λ_max``.
        floor_relative: the ``floor`` it was computed from.
        condition: ``λ_max / λ_min`` of the Gram before flooring (``inf`` when ``λ_min ≤ 0``,
            i.e. rank-deficient, for example fewer samples than features).
        n_clamped: how many eigenvalues were below the floor and raised to it.
    """

    S: torch.Tensor = field(repr=False)
    S_inv: torch.Tensor = field(repr=False)
    floor_used: float
    floor_relative: float
    condition: float
    n_clamped: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report (``condition`` is ``None`` when infinite)."""
        return {
            "floor_relative": self.floor_relative,
            "floor_used": self.floor_used,
            "condition": self.condition if math.isfinite(self.condition) else None,
            "n_clamped": self.n_clamped,
        }


@dataclass(frozen=True)
class WeightedSVD:
    """A generalised SVD ``W = U diag(s) Vh`` whose truncations are optimal for one method.

    ``U`` (m × r), ``s`` (r, descending) and ``Vh`` (r × n) are float64. ``U`` and ``Vh`` are
    orthonormal only for ``none``; for the other methods the weighting is folded into them, so
    ``U[:, :k] diag(s[:k]) Vh[:k]`` is directly the rank-k approximation of ``W``. The triple
    can be passed as ``svd=`` to :func:`laserrmt.surgery.lowrank.factor_weight`.
    ``info`` reports the method and any flooring (JSON-ready).
    """

    U: torch.Tensor = field(repr=False)
    s: torch.Tensor = field(repr=False)
    Vh: torch.Tensor = field(repr=False)
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.U, self.s, self.Vh


# ---------------------------------------------------------------------------------------------
# Helpers


def _label(module: str | None) -> str:
    return f"module {module}" if module else "the matrix"


def _check_floor(floor: float) -> float:
    if isinstance(floor, bool) or not isinstance(floor, numbers.Real) or not 0 < floor < 1:
        raise InvalidOptionError(
            f"floor {floor!r} must be a number strictly between 0 and 1 (a fraction of the "
            f"largest eigenvalue; the default is {DEFAULT_FLOOR})"
        )
    return float(floor)


def _as64(value: Any, what: str, module: str | None) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    tensor = tensor.detach().to(device=float64_device(tensor.device), dtype=torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise NumericalError(
            f"{what} of {_label(module)} contains NaN or Inf; recompute the calibration "
            "statistics (check the model dtype and the data)"
        )
    return tensor


def _svd(matrix: torch.Tensor, module: str | None) -> tuple[torch.Tensor, ...]:
    try:
        return tuple(torch.linalg.svd(matrix, full_matrices=False))
    except RuntimeError as exc:  # torch.linalg.LinAlgError: LAPACK did not converge
        raise NumericalError(f"SVD of {_label(module)} failed to converge: {exc}") from None


def _svdvals(matrix: torch.Tensor, module: str | None) -> torch.Tensor:
    try:
        return torch.linalg.svdvals(matrix)
    except RuntimeError as exc:
        raise NumericalError(f"SVD of {_label(module)} failed to converge: {exc}") from None


def _check_method(whiten: str) -> None:
    if whiten not in WHITEN_METHODS:
        raise InvalidOptionError(
            f"unknown whitening {whiten!r}; use one of {', '.join(WHITEN_METHODS)}"
        )


def _check_n_samples(n_samples: int | None, module: str | None) -> None:
    if n_samples is None:
        return
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise InvalidOptionError(
            f"n_samples {n_samples!r} for {_label(module)} must be a positive integer"
        )


def _floored(values: torch.Tensor, floor: float) -> tuple[torch.Tensor, float, int]:
    """Raise entries below ``floor · max`` to it; return them, the absolute floor and a count."""
    absolute = floor * float(values.max())
    clamped = int((values < absolute).sum())
    return values.clamp(min=absolute), absolute, clamped


# ---------------------------------------------------------------------------------------------
# Whitening


def whitening_factor(
    gram: Any,
    *,
    floor: float = DEFAULT_FLOOR,
    n_samples: int | None = None,
    module: str | None = None,
) -> Whitening:
    """A factor ``S`` with ``S Sᵀ = G`` (or ``G / n_samples``) that exists for every Gram.

    Symmetric eigendecomposition ``G = Q Λ Qᵀ`` in float64, eigenvalues below
    ``floor · λ_max`` raised to it, ``S = Q Λ^{1/2}`` and ``S⁻¹ = Λ^{-1/2} Qᵀ``. Unlike a
    Cholesky factorization (SVD-LLM) this cannot fail on a rank-deficient or badly conditioned
    Gram; the floor only changes the directions with less than ``floor`` of the top energy, and
    :attr:`Whitening.n_clamped` says how many there were.

    Args:
        gram: ``n × n`` input Gram ``Σ xᵀx`` (torch or numpy; converted to float64).
        floor: relative eigenvalue floor in (0, 1).
        n_samples: when given, factor ``G / n_samples`` (per-sample units; see the module doc).
        module: the module's name, for error messages.

    Raises:
        NumericalError: NaN/Inf in the Gram, a Gram with no positive eigenvalue (the module saw
            only zeros), or an eigendecomposition that did not converge.
        InvalidOptionError: a Gram that is not square, or a floor outside (0, 1).
    """
    floor = _check_floor(floor)
    _check_n_samples(n_samples, module)
    g = _as64(gram, "input Gram", module)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise InvalidOptionError(
            f"input Gram of {_label(module)} has shape {tuple(g.shape)}; expected a square n × n "
            "matrix"
        )
    # Accumulated sums of outer products are symmetric only up to rounding. One new n × n
    # copy (``gram`` is the caller's), which the decomposition then overwrites.
    g = torch.add(g, g.T).mul_(0.5 / (n_samples or 1))
    eigenvalues, q = _eigh_overwriting(g, module)
    del g
    top = float(eigenvalues[-1])
    if not top > 0:
        raise NumericalError(
            f"input Gram of {_label(module)} has no positive eigenvalue (the module saw only "
            "zero inputs); leave it out of the targets or use --whiten none"
        )
    bottom = float(eigenvalues[0])
    condition = top / bottom if bottom > 0 else math.inf
    floored, absolute, clamped = _floored(eigenvalues, floor)
    root = floored.sqrt()
    s_inv = q.T / root[:, None]
    s = q.mul_(root)
    return Whitening(
        S=s,
        S_inv=s_inv,
        floor_used=absolute,
        floor_relative=floor,
        condition=condition,
        n_clamped=clamped,
    )


def _eigh_overwriting(g: torch.Tensor, module: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric ``g``, which is destroyed.

    On the CPU through LAPACK's MRRR driver (``syevr``) working in ``g`` itself: besides ``g``
    only the eigenvectors and O(n) workspace, where ``torch.linalg.eigh`` (``syevd``) copies its
    input and takes 2 n² of workspace. Measured over :func:`whitening_factor` at n = 3,000:
    4.3 n² float64 beyond the Gram before, 2.4 n² now, in the same time; for the 11,008-wide
    MLP input of a 7B model, 1.8 GB less at the peak of a block. Other devices keep torch's
    own (their memory is not the host's).
    """
    try:
        if g.device.type != "cpu":
            values, vectors = torch.linalg.eigh(g)
            return values, vectors
        import scipy.linalg

        # The transpose is the same symmetric matrix, laid out as LAPACK reads it: no copy
        # (``.cpu()`` of a host tensor is the tensor itself).
        values, vectors = scipy.linalg.eigh(
            g.cpu().numpy().T, overwrite_a=True, check_finite=False, driver="evr"
        )
    except (RuntimeError, np.linalg.LinAlgError, ValueError) as exc:
        raise NumericalError(
            f"eigendecomposition of the input Gram of {_label(module)} failed: {exc}"
        ) from None
    return torch.as_tensor(values, device=g.device), torch.as_tensor(vectors, device=g.device)


class SharedWhitening:
    """The whitening of the Gram last asked for, reused while the next module shares that Gram
    object (q/k/v and gate/up read one input, so their statistics hold one Gram): one
    eigendecomposition per input instead of per module. :meth:`release` drops it (at the end
    of a block, so that it does not outlive the block's statistics)."""

    def __init__(self) -> None:
        self._gram: Any = None
        self._whitening: Whitening | None = None

    def __call__(
        self, gram: Any, *, floor: float, n_samples: int | None, module: str | None
    ) -> Whitening:
        if gram is not self._gram or self._whitening is None:
            self.release()  # before the next one is computed: one factor pair at a time
            self._whitening = whitening_factor(
                gram, floor=floor, n_samples=n_samples, module=module
            )
            self._gram = gram
        return self._whitening

    def release(self) -> None:
        self._gram, self._whitening = None, None


# ---------------------------------------------------------------------------------------------
# Weighted matrices and their SVD


@dataclass
class _Weighting:
    """``M = left · W · right``; ``left_inv`` / ``right_inv`` undo it (``None`` = identity)."""

    matrix: torch.Tensor
    left_inv: torch.Tensor | None  # m-vector: divide rows of U
    right_inv: torch.Tensor | None  # n × n matrix or n-vector: applied to Vh from the right
    info: dict[str, Any]


def _weighting(
    weight: Any,
    whiten: str,
    *,
    gram: Any,
    n_samples: int | None,
    input_abs_mean: Any,
    fisher: Any,
    floor: float,
    alpha: float,
    module: str | None,
    shared: SharedWhitening | None = None,
) -> _Weighting:
    _check_method(whiten)
    floor = _check_floor(floor)
    _check_n_samples(n_samples, module)
    w = _as64(weight, "weight", module)
    if w.ndim != 2:
        raise InvalidOptionError(
            f"weight of {_label(module)} has shape {tuple(w.shape)}; expected an out × in matrix"
        )
    m, n = w.shape
    info: dict[str, Any] = {"whiten": whiten}

    if whiten == "none":
        return _Weighting(w, None, None, info)

    if whiten == "svdllm":
        if gram is None:
            raise InvalidOptionError(
                f"--whiten svdllm needs the input Gram of {_label(module)}; collect calibration "
                "statistics first"
            )
        _check_gram_shape(gram, n, module)
        whitening = (shared or whitening_factor)(
            gram, floor=floor, n_samples=n_samples, module=module
        )
        info.update(whitening.to_dict())
        s = whitening.S.to(w.device)
        return _Weighting(w @ s, None, whitening.S_inv.to(w.device), info)

    if whiten == "asvd":
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
            raise InvalidOptionError(f"ASVD exponent alpha {alpha!r} must be a positive number")
        if input_abs_mean is not None:
            scale = _as64(input_abs_mean, "mean absolute input", module).reshape(-1)
            if scale.shape[0] != n or bool((scale < 0).any()):
                raise InvalidOptionError(
                    f"mean absolute input of {_label(module)} must hold {n} non-negative values, "
                    f"got {tuple(scale.shape)}"
                )
            info["scale"] = "mean_abs"
        else:
            if gram is None or n_samples is None:
                raise InvalidOptionError(
                    f"--whiten asvd needs the mean absolute input or the input Gram and its "
                    f"sample count for {_label(module)}; collect calibration statistics first"
                )
            g = _check_gram_shape(gram, n, module)
            scale = (g.diagonal().clamp(min=0) / n_samples).sqrt()
            info["scale"] = "rms"  # documented deviation from ASVD's mean |x|
        scale = scale.to(w.device)
        if not float(scale.max()) > 0:
            raise NumericalError(
                f"every input channel of {_label(module)} is zero on the calibration data; "
                "leave it out of the targets or use --whiten none"
            )
        d, absolute, clamped = _floored(scale**alpha, floor)
        info.update({"alpha": float(alpha), "floor_used": absolute, "n_clamped": clamped})
        return _Weighting(w * d, None, 1.0 / d, info)

    # fisher
    if fisher is None:
        raise InvalidOptionError(
            f"--whiten fisher needs the diagonal Fisher of {_label(module)}; collect calibration "
            "statistics with fisher=True"
        )
    f = _as64(fisher, "Fisher information", module)
    if tuple(f.shape) not in ((m, n), (m,)):
        raise InvalidOptionError(
            f"Fisher information of {_label(module)} has shape {tuple(f.shape)}; expected the "
            f"weight's {m}×{n} (out × in) or its {m} row sums"
        )
    if bool((f < 0).any()):
        raise NumericalError(f"Fisher information of {_label(module)} has negative entries")
    row_fisher = (f if f.ndim == 1 else f.sum(dim=1)).to(w.device)
    if not float(row_fisher.max()) > 0:
        raise NumericalError(
            f"Fisher information of {_label(module)} is zero everywhere (the loss does not "
            "depend on it on the calibration data); use another --whiten"
        )
    floored, absolute, clamped = _floored(row_fisher, floor)
    root = floored.sqrt()
    info.update({"floor_used": absolute, "n_clamped": clamped})
    return _Weighting(root[:, None] * w, 1.0 / root, None, info)


def _check_gram_shape(gram: Any, n: int, module: str | None) -> torch.Tensor:
    g = _as64(gram, "input Gram", module)
    if tuple(g.shape) != (n, n):
        raise InvalidOptionError(
            f"input Gram of {_label(module)} has shape {tuple(g.shape)} but the weight has {n} "
            "input features; the statistics belong to another module"
        )
    return g


def weighted_svd(
    weight: Any,
    *,
    whiten: WhitenMethod | str,
    gram: Any = None,
    n_samples: int | None = None,
    input_abs_mean: Any = None,
    fisher: Any = None,
    floor: float = DEFAULT_FLOOR,
    alpha: float = ASVD_ALPHA,
    module: str | None = None,
    shared: SharedWhitening | None = None,
) -> WeightedSVD:
    """The generalised SVD of an ``m × n`` (out × in) weight for one whitening method.

    ``U[:, :k] diag(s[:k]) Vh[:k]`` is the best rank-k approximation of ``W`` in the method's
    norm (see the module doc), with error ``Σ_{i>k} s_i²``; at full rank it reproduces ``W``.

    Args:
        weight: the weight matrix, out × in.
        whiten: ``none``, ``asvd``, ``svdllm`` or ``fisher``.
        gram: input Gram ``Σ xᵀx`` (n × n), for ``svdllm`` and for ``asvd`` without
            ``input_abs_mean``.
        n_samples: rows summed in ``gram``; needed by ``asvd`` from a Gram, and for ``svdllm``
            it puts the spectrum in per-sample units.
        input_abs_mean: mean ``|x|`` per input channel (n), for ``asvd``.
        fisher: diagonal Fisher of the weight, ``m × n`` (or its row sums, ``m``), for ``fisher``.
        floor: relative floor for eigenvalues / scales / Fisher row weights, in (0, 1).
        alpha: ASVD's exponent on the input scale.
        module: the module's name, for error messages.
        shared: reuse ``svdllm``'s whitening for consecutive modules sharing ``gram``.

    Raises:
        InvalidOptionError: an unknown method, or statistics missing or of the wrong shape.
        NumericalError: NaN/Inf anywhere, statistics that are zero, or a failed decomposition.
    """
    weighting = _weighting(
        weight,
        str(whiten),
        gram=gram,
        n_samples=n_samples,
        input_abs_mean=input_abs_mean,
        fisher=fisher,
        floor=floor,
        alpha=alpha,
        module=module,
        shared=shared,
    )
    u, s, vh = _svd(weighting.matrix, module)
    if weighting.left_inv is not None:
        u = weighting.left_inv[:, None] * u
    if weighting.right_inv is not None:
        right = weighting.right_inv
        vh = vh @ right if right.ndim == 2 else vh * right
    return WeightedSVD(U=u, s=s, Vh=vh, method=str(whiten), info=weighting.info)


def compensated_svd(
    weight: Any,
    gram: Any,
    cross: Any,
    *,
    n_samples: int,
    damping: float = 0.0,
    floor: float = DEFAULT_FLOOR,
    module: str | None = None,
) -> WeightedSVD:
    """A generalised SVD whose rank-k truncations best reproduce the dense layer's outputs from
    the inputs the already-compressed model gives it (error compensation).

    The layer should map its compressed-model input ``x̃_t`` to what the dense layer makes of
    the dense input ``x_t``: minimise ``Σ_t ‖W x_t − W′ x̃_t‖²`` over rank-k ``W′``. With
    ``G̃ = Σ x̃ x̃ᵀ = S Sᵀ`` (``gram``, floored as in :func:`whitening_factor`) and the cross
    moment ``C = Σ x x̃ᵀ`` (``cross``, n × n), the unconstrained minimiser is
    ``W* = W C G̃⁻¹`` and the objective equals ``‖(W′ − W*) S‖_F²`` plus a constant, so the
    truncated SVD of ``W* S = W C S⁻ᵀ`` with ``Vh`` multiplied back by ``S⁻¹`` is optimal
    (the SVD-LLM construction applied to ``W*``; with ``x̃ = x`` it is SVD-LLM itself). For a
    fixed left factor ``U_k`` the right factor ``U_kᵀ W*`` it gives is also the closed-form
    least-squares update of that factor on these inputs. ``Σ_{i>k} s_i²`` is the error above
    the irreducible part, per sample (``gram`` and ``cross`` are divided by ``n_samples``).

    ``damping`` adds ``λ ‖W′ − W‖_F²`` to the objective, with ``λ`` that fraction of the mean
    diagonal of ``G̃ / n``: the regression toward ``W*`` fits ``n²`` numbers per layer from the
    calibration tokens, and directions they hardly visit would otherwise be fitted to noise.
    In closed form it adds ``λ I`` to both moments (``W* = W (C + λI)(G̃ + λI)⁻¹``), so the
    fit falls back to the dense weight where the data say nothing (GPTQ damps its Hessian
    the same way, by 1 % of its mean diagonal).
    """
    w = _as64(weight, "weight", module)
    n = w.shape[1]
    g = _check_gram_shape(gram, n, module) / n_samples
    c = _check_gram_shape(cross, n, module) / n_samples
    if damping < 0:
        raise InvalidOptionError(f"damping {damping} must be ≥ 0")
    ridge = damping * float(torch.diagonal(g).mean()) * torch.eye(n, dtype=g.dtype, device=g.device)
    g, c = g + ridge, c + ridge
    root = whitening_factor(g, floor=floor, module=module)
    u, s, vh = _svd(w @ c.to(w.device) @ root.S_inv.T.to(w.device), module)
    return WeightedSVD(
        U=u, s=s, Vh=vh @ root.S_inv.to(w.device), method="compensated", info=root.to_dict()
    )


def whitened_svd(
    weight: Any,
    gram: Any,
    *,
    n_samples: int | None = None,
    floor: float = DEFAULT_FLOOR,
    module: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-LLM's decomposition: ``(U, σ, Vᵀ S⁻¹)`` from the SVD ``W S = U diag(σ) Vᵀ``.

    ``U[:, :k] diag(σ[:k]) (Vᵀ S⁻¹)[:k]`` is the rank-k approximation ``W′`` minimising the
    output error on the calibration inputs, ``‖X Wᵀ − X W′ᵀ‖_F² = Σ_{i>k} σ_i²`` (times
    ``n_samples`` when the Gram was normalised by it). See :func:`weighted_svd` for the
    arguments and errors.
    """
    return weighted_svd(
        weight, whiten="svdllm", gram=gram, n_samples=n_samples, floor=floor, module=module
    ).as_tuple()


def activation_aware_factors(
    weight: torch.Tensor | np.ndarray,
    rank: int,
    *,
    whiten: WhitenMethod | str,
    gram: Any = None,
    n_samples: int | None = None,
    input_abs_mean: Any = None,
    fisher: Any = None,
    floor: float = DEFAULT_FLOOR,
    alpha: float = ASVD_ALPHA,
    module: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Factors ``A`` (m × k) and ``B`` (k × n) with ``A B`` the method's best rank-k approximation.

    ``A = U_k Σ_k^{1/2}`` and ``B = Σ_k^{1/2} Vh_k`` from :func:`weighted_svd`, computed in
    float64 and cast to the weight's dtype and device: the pair to load into
    :class:`laserrmt.surgery.lowrank.LowRankLinear` (``forward = A (B x) + bias``).

    Returns:
        ``(A, B, info)``; ``info`` (JSON-ready, for a plan's ``extras``) holds the method, the
        rank, any floor and clamp count, ``tail_energy`` = ``Σ_{i>k} s_i²`` (the method's loss)
        and ``relative_loss`` = that over ``Σ s_i²``.

    Raises:
        InvalidOptionError: ``rank`` outside 1..min(m, n), or as :func:`weighted_svd`.
        NumericalError: as :func:`weighted_svd`, or factors that overflow the weight's dtype.
    """
    if not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(np.asarray(weight))
    if weight.ndim != 2:
        raise InvalidOptionError(
            f"weight of {_label(module)} has shape {tuple(weight.shape)}; expected out × in"
        )
    m, n = weight.shape
    full = min(m, n)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= full:
        raise InvalidOptionError(
            f"rank {rank!r} for {_label(module)} is outside 1..{full} (the full rank of a "
            f"{m}×{n} matrix)"
        )
    decomposition = weighted_svd(
        weight,
        whiten=whiten,
        gram=gram,
        n_samples=n_samples,
        input_abs_mean=input_abs_mean,
        fisher=fisher,
        floor=floor,
        alpha=alpha,
        module=module,
    )
    k = int(rank)
    s = decomposition.s
    root = s[:k].sqrt()
    a = (decomposition.U[:, :k] * root).to(device=weight.device, dtype=weight.dtype)
    b = (root[:, None] * decomposition.Vh[:k]).to(device=weight.device, dtype=weight.dtype)
    for factor, what in ((a, "A"), (b, "B")):
        if not bool(torch.isfinite(factor).all()):
            raise NumericalError(
                f"factor {what} of {_label(module)} overflows {weight.dtype}; raise the floor "
                "or factorize in a wider dtype"
            )
    energy = s.square()
    total = float(energy.sum())
    tail = float(energy[k:].sum())
    info = dict(decomposition.info)
    info.update(
        {
            "rank": k,
            "tail_energy": tail,
            "relative_loss": tail / total if total > 0 else 0.0,
        }
    )
    return a, b, info


def weighted_spectrum(
    weight: Any,
    *,
    whiten: WhitenMethod | str,
    gram: Any = None,
    n_samples: int | None = None,
    input_abs_mean: Any = None,
    fisher: Any = None,
    floor: float = DEFAULT_FLOOR,
    alpha: float = ASVD_ALPHA,
    module: str | None = None,
) -> np.ndarray:
    """Singular values (float64, descending) of the method's weighted matrix.

    Their tail sums ``Σ_{i>k} s_i²`` are the loss of rank k for that method: the input of
    :class:`laserrmt.allocation.LossCurve`. Only singular values are computed (no vectors).
    Arguments and errors as :func:`weighted_svd`.
    """
    weighting = _weighting(
        weight,
        str(whiten),
        gram=gram,
        n_samples=n_samples,
        input_abs_mean=input_abs_mean,
        fisher=fisher,
        floor=floor,
        alpha=alpha,
        module=module,
    )
    return _svdvals(weighting.matrix, module).cpu().numpy()


def free_rank(
    weight: Any,
    gram: Any,
    *,
    n_samples: int | None = None,
    method: str = "mp",
    floor: float = DEFAULT_FLOOR,
    module: str | None = None,
    **options: Any,
) -> RankChoice:
    """The "free" rank: how many directions of the whitened ``W S`` stand above the noise bulk.

    :func:`laserrmt.rmt.thresholds.choose_rank` applied to the spectrum of ``W S``
    (``S Sᵀ = G``, SVD-LLM's whitened weight): the directions inside the bulk can be truncated
    at an output-error cost comparable to noise. No published method applies an RMT rule in the
    whitened space. Caveat: the Marchenko–Pastur law assumes i.i.d. noise entries; whitening
    correlates the noise of ``W`` along the input eigenvectors, so for a strongly anisotropic
    Gram the bulk is a generalised MP law and the edge is approximate. Read the count as a
    diagnostic (``laserrmt analyze --whiten svdllm``), not as a guarantee.

    Args:
        method, **options: passed to ``choose_rank`` (``"mp"``, ``"tw"``, ``"gd"``…).
        Others as :func:`weighted_svd`.
    """
    from laserrmt.rmt.thresholds import choose_rank

    spectrum = weighted_spectrum(
        weight, whiten="svdllm", gram=gram, n_samples=n_samples, floor=floor, module=module
    )
    shape = tuple(np.shape(weight))
    return choose_rank(spectrum, shape, method=method, **options)
