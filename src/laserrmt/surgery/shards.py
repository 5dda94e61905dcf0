"""Sharded safetensors weights in the Hugging Face layout: written shard by shard, read lazily.

A folder holds either one ``model.safetensors`` or several ``model-00001-of-00003.safetensors``
files and ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map":
{tensor name: file}}``), the layout ``save_pretrained`` writes and ``from_pretrained`` reads.
Tensors shared by several names are stored once; the other names are recorded in the shard
files' metadata as ``alias → stored name`` (``from_pretrained`` ignores that metadata and
re-ties from the config).

:class:`ShardWriter` takes tensors one at a time and writes each one's bytes at once, so that
a caller can hand over a model block by block and free each block after it. Reading (:class:`WeightFiles`) opens each
file with ``safe_open`` and returns one tensor at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from laserrmt.errors import InvalidOptionError, ModelLoadError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: transformers' default ``max_shard_size`` ("5GB"): a 135M model stays one file.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


def shard_name(index: int, count: int) -> str:
    """``model-00001-of-00003.safetensors``, 1-based, as transformers names shards."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def check_max_shard_size(max_shard_size: int) -> int:
    """Refuse a shard size that is not a positive number of bytes."""
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int):
        raise InvalidOptionError(
            f"max_shard_size {max_shard_size!r} is not a number of bytes; pass an int such as "
            "2 * 10**9 (the CLI's --max-shard-size also reads 2GB)"
        )
    if max_shard_size <= 0:
        raise InvalidOptionError(f"max_shard_size {max_shard_size}: the size must be positive")
    return max_shard_size


#: safetensors' names of the dtypes a model holds.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ShardWriter:
    """Write tensors into shards of at most ``max_shard_size`` bytes, in the order given.

    Each tensor's bytes go to disk when it is added (a shard's data is appended to a temporary
    file, and the shard is assembled as safetensors' header followed by that data when it is
    full), so the writer never holds more than the tensor being written, whatever the shard
    size: a model handed over block by block is written in the memory of one block. A tensor
    larger than ``max_shard_size`` gets a shard of its own. Shards are written under temporary
    names and renamed by :meth:`close`, which knows their count; a single shard is
    ``model.safetensors`` without an index. Not atomic: write into a temporary folder
    (``laserrmt.outputs.atomic_output_dir``).
    """

    def __init__(self, folder: str | os.PathLike[str], max_shard_size: int) -> None:
        self.folder = Path(folder)
        self.max_shard_size = check_max_shard_size(max_shard_size)
        self._aliases: dict[str, str] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._data: Any = None
        self._data_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._total_size = 0

    @property
    def total_size(self) -> int:
        """Bytes of the tensors added so far (each stored tensor once)."""
        return self._total_size

    def alias(self, name: str, stored: str) -> None:
        """Record that ``name`` is the same tensor as the stored ``stored``."""
        self._aliases[name] = stored

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes; the shard being filled is closed first when ``tensor``
        would overflow it."""
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise InvalidOptionError(f"{name}: safetensors cannot store dtype {tensor.dtype}")
        nbytes = tensor.numel() * tensor.element_size()
        if self._entries and self._data_bytes + nbytes > self.max_shard_size:
            self._flush()
        if self._data is None:
            self._data = open(self._partial(".data"), "wb")  # noqa: SIM115 (closed by _flush)
        # Host bytes of the tensor as stored (little-endian, C order): a copy only when it is
        # on another device or not contiguous.
        host = tensor.detach().to("cpu").contiguous()
        if nbytes:
            self._data.write(host.reshape(-1).view(torch.uint8).numpy().data)
        self._entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._data_bytes, self._data_bytes + nbytes],
        }
        self._data_bytes += nbytes
        self._total_size += nbytes

    def close(self) -> list[Path]:
        """Write the last shard, give every shard its final name and write the index."""
        if self._entries or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            final = self.folder / WEIGHTS_FILE
            os.replace(self._written[0][0], final)
            return [final]
        files, weight_map = [], {}
        for index, (temporary, names) in enumerate(self._written, start=1):
            final = self.folder / shard_name(index, count)
            os.replace(temporary, final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index_data = {"metadata": {"total_size": self._total_size}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n")
        return files

    def _partial(self, suffix: str) -> Path:
        return self.folder / f".model-{len(self._written) + 1:05d}{suffix}.partial"

    def _flush(self) -> None:
        """Assemble the shard: 8-byte header length, JSON header padded to 8 bytes, data."""
        data_path = self._partial(".data")
        if self._data is None:  # an empty model: an empty but valid file
            self._data = open(data_path, "wb")  # noqa: SIM115
        self._data.close()
        # Every shard carries the aliases known so far; readers take the union, so an alias
        # recorded after its tensor's shard was written still lands in a later one.
        header = {"__metadata__": {"format": "pt", **self._aliases}, **self._entries}
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        temporary = self._partial(".safetensors")
        with open(temporary, "wb") as out, open(data_path, "rb") as data:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            shutil.copyfileobj(data, out, 16 * 2**20)
        data_path.unlink()
        self._written.append((temporary, list(self._entries)))
        self._entries = {}
        self._data = None
        self._data_bytes = 0


class WeightFiles:
    """The tensors of a folder's single or sharded safetensors weights, read one at a time.

    Construction reads only the headers (names, shapes, alias metadata); :meth:`tensors` opens
    one file at a time. A tensor read here is a copy-on-write view of safetensors' memory map
    of its file: it costs page cache, not private memory, until it is written, cast or moved
    to another device.

    Raises:
        ModelLoadError: no weights, an unreadable index or file, a shard the index names that is
            missing, or a file whose tensors are not those the index says.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._files: dict[Path, list[str]] = {}
        aliases: dict[str, str] = {}
        for file, listed in _files_and_names(self.folder).items():
            with _open(file) as handle:
                keys = list(handle.keys())
                if listed is not None and set(keys) != listed:
                    raise ModelLoadError(
                        f"{file} holds other tensors than {self.folder / INDEX_FILE} lists; the "
                        "save did not complete or the files were mixed up"
                    )
                self.shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in keys})
                aliases.update(handle.metadata() or {})
            self._files[file] = keys
        #: Names stored once under another name: ``alias → stored name``.
        self.aliases = {
            k: v for k, v in aliases.items() if v in self.shapes and k not in self.shapes
        }

    def names(self) -> list[str]:
        """The stored tensor names (aliases not included)."""
        return list(self.shapes)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every stored tensor, on the CPU, in its stored dtype, file by file."""
        for file, keys in self._files.items():
            with _open(file) as handle:
                for key in keys:
                    yield key, handle.get_tensor(key)


def rewrite_weights(folder: str | os.PathLike[str], state: Mapping[str, torch.Tensor]) -> None:
    """Write new values of the tensors stored in ``folder`` (``state``: name → tensor of the
    stored shape), each file with the tensors and aliases it holds, so that the shards and the
    index stay as they were. Each file is assembled beside the old one and renamed over it (no
    file is ever partly written), and tensors mapped from an old file (a model loaded from
    ``folder``) stay valid on POSIX systems. Not atomic across files: rewrite a temporary
    folder (``laserrmt.outputs.atomic_output_dir``)."""
    files = WeightFiles(folder)
    wrong = [n for n in files.names() if n not in state or tuple(state[n].shape) != files.shapes[n]]
    if wrong:
        raise InvalidOptionError(
            f"{wrong[0]}: the new values lack it or change its shape {files.shapes[wrong[0]]}; "
            "write the folder anew (laserrmt.save) instead"
        )
    for file, names in files._files.items():
        with tempfile.TemporaryDirectory(dir=files.folder, prefix=".rewrite-") as scratch:
            writer = ShardWriter(scratch, max_shard_size=sys.maxsize)  # one file
            for alias, stored in files.aliases.items():
                writer.alias(alias, stored)
            for name in names:
                writer.add(name, state[name])
            (written,) = writer.close()
            os.replace(written, file)


def _open(file: Path) -> Any:
    try:
        return safe_open(file, framework="pt")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelLoadError(f"{file} cannot be read: {exc}") from None


def _files_and_names(folder: Path) -> dict[Path, set[str] | None]:
    """Each weight file and the names the index puts in it (``None`` for a single file)."""
    index_file = folder / INDEX_FILE
    if not index_file.is_file():
        single = folder / WEIGHTS_FILE
        if not single.is_file():
            raise ModelLoadError(
                f"{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; the save did not complete"
            )
        return {single: None}
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{index_file} is not a safetensors index ({exc}); re-save the model"
        ) from None
    files: dict[Path, set[str]] = {}
    for name, file_name in weight_map.items():
        file = folder / str(file_name)
        if file.parent != folder:
            raise ModelLoadError(f"{index_file} names {file_name!r}, a file outside {folder}")
        files.setdefault(file, set()).add(name)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(
            f"{folder} lacks the shards {', '.join(sorted(missing))} that {INDEX_FILE} lists; "
            "the save did not complete or the folder was copied in part"
        )
    return {file: names for file, names in files.items()}
