"""Save a compressed model to a folder and load it back, exactly.

A saved folder holds:

``config.json`` (and ``generation_config.json``)
    The transformers configuration, when the model has one. When plain transformers would not
    rebuild the saved model from it (compressed modules, or tensors or ties the configured
    architecture does not have), its ``model_type`` is :data:`MODEL_TYPE` and the family's own
    one is kept under :data:`BASE_MODEL_TYPE_KEY`: ``AutoConfig`` and ``AutoModel*`` then refuse
    the folder with an error instead of filling the compressed layers with random weights.
    :func:`load` restores the family's type.
``model.safetensors``
    The state dict. Factorized layers are stored as their factors, so the file shrinks by what
    the factorization removed; tensors shared by several names (tied embeddings) are stored
    once, the other names recorded in the file's metadata as ``alias → stored name``.
tokenizer files
    When a tokenizer is given.
``laserrmt.json``
    ``format_version``, ``laserrmt_version``, ``architecture`` (the model's class name),
    ``dtype``, ``modules`` (every compressed module: its registered type and config, so that
    loading can swap in empty shells of the right shapes), ``plan`` and ``settings``.

Writing goes to a hidden temporary folder beside the output and is renamed into place only when
complete; an existing output is replaced only after the new one is complete, and never without
``overwrite=True``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from laserrmt.errors import ModelLoadError
from laserrmt.outputs import atomic_output_dir
from laserrmt.plan import CompressionPlan
from laserrmt.surgery.registry import (
    CompressedModule,
    dtype_from_name,
    dtype_name,
    module_class,
    registered_modules,
)
from laserrmt.surgery.replace import set_submodule

#: Version of the folder layout; :func:`load` refuses any other.
FORMAT_VERSION = 1
METADATA_FILE = "laserrmt.json"
WEIGHTS_FILE = "model.safetensors"
_TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json")
CONFIG_FILE = "config.json"
#: ``model_type`` of a folder that only :func:`load` rebuilds; unknown to transformers.
MODEL_TYPE = "laserrmt"
#: Where such a ``config.json`` keeps the model family's own ``model_type``.
BASE_MODEL_TYPE_KEY = "laserrmt_base_model_type"


def save_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    plan: CompressionPlan | None = None,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (compressed or not) to ``out_dir`` atomically; returns the folder.

    Args:
        model: the model, typically after :func:`~laserrmt.surgery.apply.apply_plan`.
        out_dir: the folder to create.
        tokenizer: saved with ``save_pretrained`` when given.
        plan: recorded in ``laserrmt.json`` so the result documents how it was made.
        settings: further JSON-serializable provenance (method options, scores...).
        overwrite: replace an existing ``out_dir`` (only once the new folder is complete).

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false, or it is a file.
    """
    metadata = _metadata(model, _compressed_module_entries(model), plan, settings)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _write_folder(model, tmp, tokenizer, metadata)
    return Path(out_dir)


def write_compressed(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    plan: CompressionPlan | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write the same files as :func:`save_compressed` into an existing ``folder``, in place.

    Not atomic by itself: for callers that write more files (evaluation, report) into a
    temporary folder they rename into place themselves (``laserrmt.outputs.atomic_output_dir``).
    """
    target = Path(folder)
    if not target.is_dir():
        raise FileNotFoundError(f"{target} is not an existing folder; create it first")
    metadata = _metadata(model, _compressed_module_entries(model), plan, settings)
    _write_folder(model, target, tokenizer, metadata)
    return target


def load(
    path: str | os.PathLike[str], *, dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any | None]:
    """Load a folder written by :func:`save_compressed`: ``(model, tokenizer or None)``.

    The architecture is built from ``config.json`` with the transformers class named in
    ``laserrmt.json``, compressed modules are swapped in as empty shells, and the weights are
    loaded strictly (only tied aliases may be absent from the file; they are re-tied). The model
    is returned in eval mode, in the saved dtype unless ``dtype`` asks for another.

    Raises:
        ModelLoadError: not a laserrmt folder, a newer format, an unknown architecture or module
            type, or weights that do not fit the architecture.
    """
    folder = Path(path)
    meta = _read_metadata(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ModelLoadError(
            f"{folder} has no config.json, so the model is not a transformers model; build the "
            "architecture yourself and call laserrmt.surgery.io.load_into(model, path)"
        )
    architecture = meta.get("architecture")
    model_cls = _transformers_class(architecture, folder)

    import transformers

    config = _read_config(folder)
    saved_dtype = dtype_from_name(meta.get("dtype", "float32"))
    model = model_cls._from_config(config, dtype=saved_dtype)
    if (folder / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    load_into(model, folder)
    if dtype is not None:
        model.to(dtype)
    model.eval()

    tokenizer = None
    if any((folder / marker).is_file() for marker in _TOKENIZER_MARKERS):
        try:
            # Given the config: the tokenizer would otherwise read config.json on its own.
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, config=config)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"tokenizer files in {folder} cannot be read: {exc}") from None
    return model, tokenizer


def load_into(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Swap the saved compressed modules into ``model`` and load the saved weights strictly.

    ``model`` must be the uncompressed architecture the folder was saved from (for models
    without a transformers config, e.g. a torchvision network you build yourself).

    Raises:
        ModelLoadError: a module name that does not exist, missing or unexpected tensors, or a
            tensor whose shape differs from the model's.
    """
    folder = Path(path)
    meta = _read_metadata(folder)
    modules = meta.get("modules", {})
    if not isinstance(modules, Mapping):
        raise ModelLoadError(f"'modules' in {folder / METADATA_FILE} must be a JSON object")
    for name, entry in modules.items():
        if not isinstance(entry, Mapping) or "type" not in entry or "config" not in entry:
            raise ModelLoadError(
                f"entry for module {name} in {folder / METADATA_FILE} needs 'type' and 'config'"
            )
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(
                f"module {name} recorded in {folder / METADATA_FILE} does not exist in "
                f"{type(model).__name__}; the folder was saved from another architecture"
            ) from None
        shell = module_class(str(entry["type"])).from_laserrmt_config(entry["config"])
        set_submodule(model, name, shell)

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{folder} has no {WEIGHTS_FILE}; the save did not complete")
    try:
        state = load_file(weights)
        with safe_open(weights, framework="pt") as handle:
            file_meta = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelLoadError(f"{weights} cannot be read: {exc}") from None

    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ModelLoadError(
            f"{weights} holds tensors the model does not have ({_few(unexpected)}); "
            "the folder was saved from another architecture"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelLoadError(
                f"tensor {key} has shape {tuple(tensor.shape)} in {weights} but "
                f"{tuple(expected[key].shape)} in the model; the folder does not fit this "
                "architecture"
            )
    aliases = {k: v for k, v in file_meta.items() if k not in state and v in state}
    missing = sorted(k for k in set(expected) - set(state) if k not in aliases)
    if missing:
        raise ModelLoadError(
            f"{weights} lacks tensors the model needs ({_few(missing)}); the save is incomplete "
            "or was made from another architecture"
        )
    _untie_separately_stored(model, state)
    model.load_state_dict(state, strict=False)
    for alias, stored in aliases.items():
        if alias in expected:
            _tie(model, alias, stored)
    return model


# ---------------------------------------------------------------------------------------------
# Saving


def _compressed_module_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    registry = registered_modules()
    entries: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, CompressedModule):
            continue
        type_name = type(module).__name__
        if registry.get(type_name) is not type(module):
            raise TypeError(
                f"{type_name} at {name} is a CompressedModule but not registered; "
                "decorate it with @register_module so it can be loaded"
            )
        entries[name] = {"type": type_name, "config": module.laserrmt_config()}
    return entries


def _metadata(
    model: nn.Module,
    modules: dict[str, dict[str, Any]],
    plan: CompressionPlan | None,
    settings: Mapping[str, Any] | None,
) -> dict[str, Any]:
    from laserrmt import __version__  # at call time: laserrmt/__init__ may import this module

    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    meta = {
        "format_version": FORMAT_VERSION,
        "laserrmt_version": __version__,
        "architecture": type(model).__name__,
        "dtype": dtype_name(floating[0] if floating else torch.float32),
        "torch_version": torch.__version__,
        "modules": modules,
        "plan": plan.to_dict() if plan is not None else None,
        "settings": dict(settings or {}),
    }
    # Fail before writing anything when provenance cannot be stored.
    json.dumps(meta, default=_json_default)
    return meta


def _write_folder(
    model: nn.Module, folder: Path, tokenizer: Any | None, metadata: dict[str, Any]
) -> None:
    config = _hf_config(model)
    if config is not None:
        config.save_pretrained(folder)
        if metadata["modules"] or not _rebuilt_by_transformers(model, config):
            _mark_config(folder / CONFIG_FILE)
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(folder)
    _write_weights(model, folder / WEIGHTS_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    # laserrmt.json last: its presence marks a complete folder.
    text = json.dumps(metadata, indent=2, ensure_ascii=False, default=_json_default)
    (folder / METADATA_FILE).write_text(text + "\n", encoding="utf-8")


def _hf_config(model: nn.Module) -> Any | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return None
    config = copy.deepcopy(config)
    # A GGUF- or otherwise-quantized load is dequantized in memory; the saved weights are plain.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.architectures = [type(model).__name__]
    return config


def _rebuilt_by_transformers(model: nn.Module, config: Any) -> bool:
    """Whether ``from_pretrained`` would rebuild ``model`` from ``config`` and the saved tensors.

    It does when the configured architecture has the same tensors (names and shapes) and ties
    the same ones: then every saved tensor lands where it belongs and nothing stays random.
    """
    try:
        with torch.device("meta"):  # shapes only, no memory
            fresh = type(model)._from_config(config)  # type: ignore[attr-defined]
            fresh.tie_weights()  # as from_pretrained does; _from_config does not in some 5.x
    except Exception:  # an architecture transformers cannot build: only load() can
        return False
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    fresh_shapes = {k: tuple(t.shape) for k, t in fresh.state_dict().items()}
    return shapes == fresh_shapes and _ties(model) == _ties(fresh)


def _ties(model: nn.Module) -> set[frozenset[str]]:
    """The groups of parameter names that share one tensor."""
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return {frozenset(names) for names in groups.values() if len(names) > 1}


def _mark_config(file: Path) -> None:
    """Give ``config.json`` a ``model_type`` transformers refuses, keeping the family's own."""
    config = json.loads(file.read_text(encoding="utf-8"))
    config[BASE_MODEL_TYPE_KEY] = config["model_type"]
    config["model_type"] = MODEL_TYPE
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def distinct_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with every tensor once, and the tied names: ``(tensors, alias → name)``.

    The first name in state-dict order is kept: for transformers models that is the input
    embedding, the source of a tied output head.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, tensor in model.state_dict().items():
        identity = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        stored[key] = tensor
    return stored, aliases


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors :func:`save_compressed` writes (each tied tensor once), without the
    safetensors header (a JSON index of about 100 bytes per tensor)."""
    stored, _ = distinct_state(model)
    return sum(t.numel() * t.element_size() for t in stored.values())


def _write_weights(model: nn.Module, file: Path) -> None:
    """Write the state dict once per distinct tensor; tied names go to the metadata."""
    stored, aliases = distinct_state(model)
    contiguous = {key: t.detach().to("cpu").contiguous() for key, t in stored.items()}
    save_file(contiguous, str(file), metadata={"format": "pt", **aliases})


def _json_default(value: object) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable; pass plain values")


# ---------------------------------------------------------------------------------------------
# Loading


def _read_metadata(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; pass a folder written by save_compressed")
    file = folder / METADATA_FILE
    if not file.is_file():
        raise ModelLoadError(
            f"{folder} has no {METADATA_FILE}, so it is not a laserrmt output; load a plain "
            "transformers folder with from_pretrained"
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} cannot be read as JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{file} must hold a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{file} has format_version {version!r} but this laserrmt reads {FORMAT_VERSION} "
            f"(it was written by laserrmt {meta.get('laserrmt_version', '?')}); "
            "install that laserrmt version to load it"
        )
    return meta


def _read_config(folder: Path) -> Any:
    """The transformers config in ``folder``, with the family's ``model_type`` restored."""
    import transformers

    file = folder / CONFIG_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object")
    if data.get("model_type") == MODEL_TYPE:
        data["model_type"] = data.pop(BASE_MODEL_TYPE_KEY, None)
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise ModelLoadError(
            f"{file} names model_type {model_type!r}, unknown to transformers "
            f"{transformers.__version__}; upgrade transformers"
        )
    try:
        return transformers.CONFIG_MAPPING[model_type].from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{file} cannot be read: {exc}") from None


def _transformers_class(name: object, folder: Path) -> Any:
    import transformers

    model_cls = getattr(transformers, str(name), None) if isinstance(name, str) else None
    if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)):
        raise ModelLoadError(
            f"architecture {name!r} in {folder / METADATA_FILE} is not a transformers model class "
            f"of transformers {transformers.__version__}; upgrade transformers or use load_into"
        )
    return model_cls


def _tie(model: nn.Module, alias: str, stored: str) -> None:
    """Make ``alias`` the same tensor as ``stored`` (a tie the fresh model may not have)."""
    parent_name, _, attr = alias.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    source_parent_name, _, source_attr = stored.rpartition(".")
    source_parent = model.get_submodule(source_parent_name) if source_parent_name else model
    source = getattr(source_parent, source_attr)
    if getattr(parent, attr) is not source:
        setattr(parent, attr, source)


def _untie_separately_stored(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give each name its own parameter where the fresh model ties tensors the file stores apart.

    A config may still say ``tie_word_embeddings`` after the saved model was untied; loading
    both tensors into one shared parameter would silently keep only the last.
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        stored_apart = [n for n in names if n in state]
        for name in stored_apart[1:]:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            shared = getattr(parent, attr)
            setattr(parent, attr, nn.Parameter(shared.detach().clone(), shared.requires_grad))


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
