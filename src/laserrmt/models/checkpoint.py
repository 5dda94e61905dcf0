"""Checkpoints read lazily: one tensor at a time, never the whole model.

:class:`Checkpoint` opens a Hugging Face model folder (``model.safetensors``, or shards named by
``model.safetensors.index.json``), a single ``.safetensors`` file next to its ``config.json``,
a ``.gguf`` file, or the packaged default model (its converted safetensors cache, see
:mod:`laserrmt.models.loading`). It lists the tensor names, their shapes and dtypes from the
headers alone, and reads a tensor only when :meth:`Checkpoint.get` asks for it.

Memory: every :meth:`~Checkpoint.get` opens the safetensors file for that one tensor; the tensor
is backed by a memory map of its own bytes, which is released with the tensor, so the pages read
leave this process's resident set when the caller drops it (one long-lived map of the whole file
would keep every page ever read resident). A GGUF file stays mapped (gguf's reader has no
per-tensor open); its tensors are dequantised one at a time, to float32.

GGUF tensor names (``blk.3.attn_q.weight``) are mapped to the model's names
(``model.layers.3.self_attn.q_proj.weight``) with transformers' own GGUF tables and tensor
processors (which also undo llama.cpp's permutation of query/key rows and GPT-2's transposes),
so a GGUF checkpoint reads exactly as transformers would load it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from laserrmt.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors' header dtype codes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class Checkpoint:
    """A model checkpoint opened lazily; use :func:`open_checkpoint` to make one.

    ``source`` describes it for reports; ``path`` is the folder or file read (the cache folder
    for the default model); ``kind`` is ``"safetensors"`` or ``"gguf"``.
    """

    def __init__(
        self,
        *,
        path: Path,
        kind: str,
        source: str,
        config: Any,
        headers: dict[str, tuple[tuple[int, ...], torch.dtype]],
        files: dict[str, Path] | None = None,
        gguf: _GGUFTensors | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.source = source
        self.config = config
        self._headers = headers
        self._files = files or {}
        self._gguf = gguf

    def names(self) -> list[str]:
        """Every tensor name, in the model's (transformers') naming, in stored order."""
        return list(self._headers)

    def __contains__(self, name: object) -> bool:
        return name in self._headers

    def __len__(self) -> int:
        return len(self._headers)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor, read from the header (no data is read)."""
        return self._header(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        """The dtype :meth:`get` returns by default: the stored one (float32 for GGUF)."""
        return self._header(name)[1]

    def get(
        self,
        name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Read one tensor, then move and convert it (``None``: CPU, the stored dtype)."""
        self._header(name)
        if self._gguf is not None:
            tensor = self._gguf.read(name)
        else:
            from safetensors import safe_open

            with safe_open(str(self._files[name]), framework="pt") as handle:
                # Backed by this tensor's own memory map: freed with the tensor.
                tensor = handle.get_tensor(name)
        return tensor.to(device=device or "cpu", dtype=dtype or tensor.dtype)

    def tensors(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in turn, each read only when reached."""
        for name in self._headers:
            yield name, self.get(name, device, dtype)

    def _header(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        try:
            return self._headers[name]
        except KeyError:
            raise KeyError(f"{self.source} holds no tensor named {name!r}") from None


def readable_lazily(spec: str | os.PathLike[str] | None) -> bool:
    """Whether :func:`open_checkpoint` reads ``spec`` lazily: the default model, a folder with
    safetensors weights not written by laserrmt, or a ``.gguf`` file. Hub ids, pickle
    checkpoints and compressed folders are read whole by :func:`~laserrmt.models.loading.
    load_model`."""
    if spec is None:
        return True
    path = Path(os.fspath(spec)).expanduser()
    if path.is_dir():
        weights = (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()
        return weights and not (path / "laserrmt.json").is_file()
    return path.is_file() and path.suffix.lower() == ".gguf"


def open_checkpoint(
    spec: str | os.PathLike[str] | None = None, *, trust_remote_code: bool = False
) -> Checkpoint:
    """Open a checkpoint lazily: ``None`` (the default model), a folder, or a file.

    Reads headers and ``config.json`` only. Raises :class:`~laserrmt.errors.ModelLoadError` for a
    missing path, a folder without safetensors weights, an index naming a missing shard, a file
    of another format, or a config that would run code without ``trust_remote_code``.
    """
    from laserrmt.models import loading

    if spec is None:
        folder = loading.default_model_folder()
        checkpoint = _open_folder(folder, trust_remote_code)
        checkpoint.source = loading.DEFAULT_MODEL_SOURCE
        return checkpoint
    path = Path(os.fspath(spec)).expanduser()
    if path.is_dir():
        return _open_folder(path, trust_remote_code)
    if not path.is_file():
        raise ModelLoadError(f"no such file or folder: {path}; pass a model folder or file")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return _open_gguf(path)
    if suffix == ".safetensors":
        config = _config(path.parent, trust_remote_code)
        headers, files = _safetensors_headers([path])
        return Checkpoint(
            path=path,
            kind="safetensors",
            source=str(path),
            config=config,
            headers=headers,
            files=files,
        )
    raise ModelLoadError(
        f"{path} is not a checkpoint laserrmt reads lazily (safetensors or .gguf); pass a model "
        "folder with safetensors weights or a .gguf file"
    )


def _open_folder(folder: Path, trust_remote_code: bool) -> Checkpoint:
    index = folder / INDEX_FILE
    if index.is_file():
        shards = _index_shards(folder, index)
    elif (folder / SINGLE_FILE).is_file():
        shards = [folder / SINGLE_FILE]
    else:
        found = sorted(p.name for p in folder.iterdir())[:6]
        raise ModelLoadError(
            f"{folder} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}; found "
            f"{', '.join(found) or 'nothing'}); pass the folder save_pretrained wrote"
        )
    config = _config(folder, trust_remote_code)
    headers, files = _safetensors_headers(shards)
    return Checkpoint(
        path=folder,
        kind="safetensors",
        source=str(folder),
        config=config,
        headers=headers,
        files=files,
    )


def _index_shards(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            f"{index} is not a valid shard index ({exc!r}); restore or re-save the model"
        ) from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise ModelLoadError(
            f"{folder} lacks {len(missing)} weight shard(s) its index names (e.g. {missing[0]}); "
            "copy the whole folder"
        )
    return [folder / s for s in shards]


def _safetensors_headers(
    files: list[Path],
) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, Path]]:
    from safetensors import safe_open

    headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in list(handle.keys()):
                    view = handle.get_slice(name)
                    headers[name] = (
                        tuple(int(d) for d in view.get_shape()),
                        _SAFETENSORS_DTYPES[view.get_dtype()],
                    )
                    where[name] = file
        except Exception as exc:
            raise ModelLoadError(
                f"{file} is not a readable safetensors file ({_first_line(exc)}); it is corrupt "
                "or truncated: copy or save it again"
            ) from None
    if not headers:
        raise ModelLoadError(f"{files[0]} holds no tensors; copy or save the model again")
    return headers, where


def _config(folder: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    from laserrmt.models import loading

    raw = loading._read_config(folder)
    if (folder / "laserrmt.json").is_file():
        raise ModelLoadError(
            f"{folder} was written by laserrmt (compressed layers); it is read whole by "
            "laserrmt.load, not lazily"
        )
    loading._check_remote_code(raw, str(folder), trust_remote_code)
    try:
        return AutoConfig.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(
            f"{folder}/config.json cannot be read as a transformers config ({_first_line(exc)}); "
            "restore or re-save the model"
        ) from None


def empty_model(config: Any, *, task: str = "auto", trust_remote_code: bool = False) -> nn.Module:
    """The model a config describes, with every parameter on the meta device (no memory).

    Buffers computed from the config (rotary frequencies) stay real, as accelerate's
    ``init_empty_weights`` leaves them; tied weights are tied, so a head tied to the embedding is
    the same parameter object.
    """
    from accelerate import init_empty_weights

    from laserrmt.models import loading

    auto_class = loading._auto_class(
        task, getattr(config, "architectures", None), getattr(config, "model_type", None)
    )
    with init_empty_weights():
        model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model.eval()


# --------------------------------------------------------------------------- GGUF


class _GGUFTensors:
    """The tensors of a GGUF file under transformers' names, dequantised one at a time."""

    def __init__(self, path: Path, reader: Any, processor: Any, gguf_to_hf: dict[str, str]):
        self.path = path
        self._reader = reader
        self._processor = processor
        self._gguf_to_hf = gguf_to_hf
        self._by_hf = {gguf_to_hf[t.name]: t for t in reader.tensors if t.name in gguf_to_hf}

    def names(self) -> list[str]:
        return list(self._by_hf)

    def read(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        tensor = self._by_hf[name]
        parsed: dict[str, Any] = {"tensors": {}}
        result = self._processor.process(
            weights=dequantize(tensor.data, tensor.tensor_type),
            name=tensor.name,
            tensor_key_mapping=self._gguf_to_hf,
            parsed_parameters=parsed,
        )
        if result.name is None:  # the processor stored the tensor under its final name itself
            return parsed["tensors"][name].to(torch.float32)
        return torch.from_numpy(np.array(result.weights, dtype=np.float32))


def _open_gguf(path: Path) -> Checkpoint:
    from laserrmt.models import loading

    with path.open("rb") as handle:
        if handle.read(4) != loading._GGUF_MAGIC:
            raise ModelLoadError(
                f"{path} is not a GGUF file (it does not start with 'GGUF'); it is corrupt or "
                "another format: download or convert it again"
            )
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(
                f"reading GGUF files needs the {module} package; pip install 'laserrmt[gguf]'"
            )
    from gguf import GGUFReader
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        reader = GGUFReader(path)
        architecture = str(read_field(reader, "general.architecture")[0])
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not read {path} as a model ({_first_line(exc)}); the GGUF file may be "
            "truncated, corrupt, or of an architecture transformers does not read"
        ) from None
    skeleton = empty_model(config, task="causal-lm")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    gguf_to_hf = get_gguf_hf_weights_map(skeleton, processor)
    tensors = _GGUFTensors(path, reader, processor, gguf_to_hf)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict(keep_vars=True).items()}
    headers = {name: (shapes[name], torch.float32) for name in tensors.names() if name in shapes}
    if not headers:
        raise ModelLoadError(
            f"{path}: none of its tensors maps to a {type(skeleton).__name__} weight; the GGUF "
            "architecture is not one laserrmt can read lazily"
        )
    return Checkpoint(
        path=path, kind="gguf", source=str(path), config=config, headers=headers, gguf=tensors
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
