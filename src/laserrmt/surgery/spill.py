"""SVD factors kept on disk between the two passes of a global budget.

A global budget needs every matrix's singular values before it can give any matrix its rank,
but only the allocated leading triplets of each factorization afterwards. Holding all factors
in memory between the two moments costs float64 ``U`` and ``Vh`` of every target at once (the
largest part of the budget method's peak). :class:`FactorSpill` writes them one block at a time
to a private temporary folder (one safetensors file per block, float64, so they read back bit
for bit) and reads back one module's leading ``rank`` triplets at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import torch
from safetensors import safe_open
from safetensors.torch import save_file

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class FactorSpill(Mapping[str, Factors]):
    """Module name → ``(U, s, Vh)`` float64 factors stored on disk, read lazily.

    Used as ``svd_cache`` of :func:`laserrmt.surgery.apply.apply_plan`: each lookup reads only
    that module's first :attr:`ranks` triplets (all stored ones when it has no rank), so at most
    one module's factors are in memory on the reading side. The folder is created under
    ``parent`` (the system temporary folder by default, ``TMPDIR`` decides) and removed by
    :meth:`close` or on leaving a ``with`` block, also after an error.
    """

    def __init__(self, parent: str | Path | None = None) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="laserrmt-factors-", dir=parent)
        self._files: dict[str, Path] = {}
        self.ranks: dict[str, int] = {}

    @property
    def folder(self) -> Path:
        return Path(self._folder.name)

    def write(self, factors: Mapping[str, Factors]) -> None:
        """Store one block's factors in a new file (the caller then drops its copies)."""
        if not factors:
            return
        path = self.folder / f"block-{len(set(self._files.values())):05d}.safetensors"
        tensors = {}
        for name, parts in factors.items():
            for key, part in zip(("U", "s", "Vh"), parts, strict=True):
                # safetensors writes from host memory: the one host copy of the spill.
                tensors[f"{name}.{key}"] = part.detach().to(torch.float64).cpu().contiguous()
        save_file(tensors, str(path))
        for name in factors:
            self._files[name] = path

    def __getitem__(self, name: str) -> Factors:
        path = self._files[name]
        rank = self.ranks.get(name)
        with safe_open(str(path), framework="pt") as file:
            if rank is None:
                return tuple(file.get_tensor(f"{name}.{key}") for key in ("U", "s", "Vh"))
            return (
                file.get_slice(f"{name}.U")[:, :rank],
                file.get_slice(f"{name}.s")[:rank],
                file.get_slice(f"{name}.Vh")[:rank],
            )

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        """Remove the folder and everything in it."""
        self._files.clear()
        self._folder.cleanup()

    def __enter__(self) -> FactorSpill:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
