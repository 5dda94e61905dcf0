"""Save a compressed model to a folder and load it back, exactly.

A saved folder holds:

``config.json`` (and ``generation_config.json``)
    The transformers configuration, when the model has one. When plain transformers would not
    rebuild the saved model from it (compressed modules, or tensors or ties the configured
    architecture does not have), its ``model_type`` is :data:`MODEL_TYPE` and the family's own
    one is kept under :data:`BASE_MODEL_TYPE_KEY`: ``AutoConfig`` and ``AutoModel*`` then refuse
    the folder with an error instead of filling the compressed layers with random weights.
    :func:`load` restores the family's type. Such a config also lists the compressed modules
    (``laserrmt_modules``, as in ``laserrmt.json``) and has an ``auto_map`` naming the files below.
``configuration_laserrmt.py``, ``modeling_laserrmt.py``
    Beside a marked ``config.json``: the modelling code (:mod:`laserrmt.surgery.hf_code`) with
    which ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` loads the folder
    without laserrmt.
``model.safetensors``, or shards ``model-00001-of-00003.safetensors`` with ``model.safetensors.index.json``
    The state dict, in shards of at most ``max_shard_size`` bytes (transformers' layout and
    default, 5 GB; see :mod:`laserrmt.surgery.shards`). Factorized layers are stored as their
    factors, so the files shrink by what the factorization removed; tensors shared by several
    names (tied embeddings) are stored once, the other names recorded in the files' metadata as
    ``alias → stored name``.
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
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from laserrmt.errors import InvalidOptionError, ModelLoadError
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
from laserrmt.surgery.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardWriter,
    WeightFiles,
    check_max_shard_size,
)

#: Version of the folder layout; :func:`load` refuses any other.
FORMAT_VERSION = 1
METADATA_FILE = "laserrmt.json"
_TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json")
CONFIG_FILE = "config.json"
#: ``model_type`` of a folder that only :func:`load` rebuilds; unknown to transformers.
MODEL_TYPE = "laserrmt"
#: Where such a ``config.json`` keeps the model family's own ``model_type``.
BASE_MODEL_TYPE_KEY = "laserrmt_base_model_type"
#: The modelling code a marked folder carries for ``trust_remote_code`` (:mod:`.hf_code`).
HF_CODE_FILES = ("configuration_laserrmt.py", "modeling_laserrmt.py")


def save_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    plan: CompressionPlan | None = None,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``model`` (compressed or not) to ``out_dir`` atomically; returns the folder.

    Args:
        model: the model, typically after :func:`~laserrmt.surgery.apply.apply_plan`.
        out_dir: the folder to create.
        tokenizer: saved with ``save_pretrained`` when given.
        plan: recorded in ``laserrmt.json`` so the result documents how it was made.
        settings: further JSON-serializable provenance (method options, scores...).
        overwrite: replace an existing ``out_dir`` (only once the new folder is complete).
        max_shard_size: bytes per weight file at most; a larger model is split into shards with
            an index, as ``save_pretrained`` does (a single larger tensor gets its own shard).

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false, or it is a file.
        InvalidOptionError: ``max_shard_size`` is not a positive number of bytes.
    """
    check_max_shard_size(max_shard_size)
    metadata = _metadata(model, _compressed_module_entries(model), plan, settings)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _write_folder(model, tmp, tokenizer, metadata, max_shard_size)
    return Path(out_dir)


def write_compressed(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    plan: CompressionPlan | None = None,
    settings: Mapping[str, Any] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    weights_written: bool = False,
) -> Path:
    """Write the same files as :func:`save_compressed` into an existing ``folder``, in place.

    Not atomic by itself: for callers that write more files (evaluation, report) into a
    temporary folder they rename into place themselves (``laserrmt.outputs.atomic_output_dir``).
    ``weights_written``: the weight files are already in ``folder`` (written block by block by
    the streaming pipeline); ``model`` is then the skeleton with the compressed layers' shapes,
    possibly on the meta device, and only the configuration and metadata are written.
    """
    target = Path(folder)
    if not target.is_dir():
        raise FileNotFoundError(f"{target} is not an existing folder; create it first")
    check_max_shard_size(max_shard_size)
    metadata = _metadata(model, _compressed_module_entries(model), plan, settings)
    _write_folder(model, target, tokenizer, metadata, None if weights_written else max_shard_size)
    return target


def load(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device_map: str | Mapping[str, str | int | torch.device] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, Any | None]:
    """Load a folder written by :func:`save_compressed`: ``(model, tokenizer or None)``.

    The architecture is built from ``config.json`` with the transformers class named in
    ``laserrmt.json`` without weights (accelerate's ``init_empty_weights``), compressed modules
    are swapped in as empty shells, and the saved tensors are read one at a time from the single
    or sharded weight files and put in place (only tied aliases may be absent from the files;
    they are re-tied): no second copy of the weights is built. The model is returned in eval
    mode, in the saved dtype unless ``dtype`` asks for another.

    Args:
        dtype: cast floating-point tensors to this dtype as they are read.
        device_map: where each module goes, for a model that does not fit on one device:
            ``{module name prefix: device}`` (``""`` is the whole model; a device is ``"cpu"``,
            ``"cuda:1"``, a GPU index, or ``"disk"``), ``"auto"`` (accelerate's
            ``infer_auto_device_map`` over the GPUs, the CPU and, past those, the disk), or one
            device for everything. The model is then dispatched with accelerate's
            ``dispatch_model``, which moves activations between devices in the forward pass.
            ``None``: everything on the CPU, no hooks.
        offload_folder: where tensors mapped to ``"disk"`` are written (needed then).

    Raises:
        ModelLoadError: not a laserrmt folder, a newer format, an unknown architecture or module
            type, or weights that do not fit the architecture.
        InvalidOptionError: a device map that leaves tensors without a device, names modules
            the model does not have, splits tied tensors, or has ``"disk"`` without
            ``offload_folder``.
    """
    from accelerate import init_empty_weights

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
    # Buffers stay real: non-persistent ones (rotary frequencies) are computed here, not saved.
    with init_empty_weights(include_buffers=False):
        model = model_cls._from_config(config, dtype=dtype or saved_dtype)
    if (folder / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    _swap_in_shells(model, folder, meta)
    devices = _resolve_device_map(model, device_map, dtype or saved_dtype, offload_folder)
    files = WeightFiles(folder)
    aliases = _check_tensors(model, files)
    _read_tensors(model, files, aliases, devices, dtype, offload_folder)
    if device_map is not None:
        from accelerate import dispatch_model

        dispatch_model(model, devices, offload_dir=offload_folder)
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
    without a transformers config, e.g. a torchvision network you build yourself). Each tensor
    is read on its own and lands on the device of the tensor it replaces (the CPU for swapped-in
    compressed modules).

    Raises:
        ModelLoadError: a module name that does not exist, missing or unexpected tensors, or a
            tensor whose shape differs from the model's.
    """
    folder = Path(path)
    _swap_in_shells(model, folder, _read_metadata(folder))
    files = WeightFiles(folder)
    aliases = _check_tensors(model, files)
    devices = {
        name: "cpu" if tensor.is_meta else tensor.device
        for name, tensor in model.state_dict().items()
    }
    _read_tensors(model, files, aliases, devices, None, None)
    return model


def _swap_in_shells(model: nn.Module, folder: Path, meta: Mapping[str, Any]) -> None:
    """Replace every module recorded in ``laserrmt.json`` by an empty shell of its saved type.

    The shells are built on the meta device (buffers too: a compressed module's buffers are all
    in the weight files), so they cost no memory until the weights are read.
    """
    from accelerate import init_empty_weights

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
        shell_class = module_class(str(entry["type"]))
        with init_empty_weights(include_buffers=True):
            shell = shell_class.from_laserrmt_config(entry["config"])
        set_submodule(model, name, shell)


def _check_tensors(model: nn.Module, files: WeightFiles) -> dict[str, str]:
    """Compare the stored names and shapes with the model's before reading any tensor; returns
    the tied aliases to restore (``alias → stored name``)."""
    where = files.folder
    expected = model.state_dict()
    stored = files.names()
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise ModelLoadError(
            f"the weights in {where} hold tensors the model does not have ({_few(unexpected)}); "
            "the folder was saved from another architecture"
        )
    for key, shape in files.shapes.items():
        if shape != tuple(expected[key].shape):
            raise ModelLoadError(
                f"tensor {key} has shape {shape} in {where} but {tuple(expected[key].shape)} in "
                "the model; the folder does not fit this architecture"
            )
    aliases = {k: v for k, v in files.aliases.items() if k in expected}
    missing = sorted(k for k in set(expected) - set(stored) if k not in aliases)
    if missing:
        raise ModelLoadError(
            f"the weights in {where} lack tensors the model needs ({_few(missing)}); the save "
            "is incomplete or was made from another architecture"
        )
    return aliases


def _read_tensors(
    model: nn.Module,
    files: WeightFiles,
    aliases: Mapping[str, str],
    devices: Mapping[str, Any],
    dtype: torch.dtype | None,
    offload_folder: str | os.PathLike[str] | None,
) -> None:
    """Put each stored tensor in place on its device (``devices``: longest module prefix →
    device), one at a time; a tensor mapped to ``"disk"`` is written to ``offload_folder``
    in accelerate's offload format and stays on the meta device.

    Each name gets a new tensor, so names the fresh model ties but the files store apart (a
    config that still says ``tie_word_embeddings`` after the head was changed) come apart.
    """
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device

    for alias, stored in aliases.items():
        pair = (_device_of(alias, devices), _device_of(stored, devices))
        if pair[0] != pair[1]:
            raise InvalidOptionError(
                f"device_map puts {alias} and {stored}, one tensor tied in the model, on "
                f"{pair[0]} and {pair[1]}; put both modules on the same device"
            )
    expected = model.state_dict()
    offload_index: dict[str, Any] = {}
    for name, value in files.tensors():
        # As load_state_dict: the model's dtype, or the asked one for floating-point tensors.
        target = dtype if dtype is not None and value.is_floating_point() else expected[name].dtype
        value = value.to(target)
        device = _device_of(name, devices)
        if device == "disk":
            offload_weight(value, name, str(offload_folder), index=offload_index)
            continue
        set_module_tensor_to_device(model, name, device, value=value, dtype=target)
    if offload_index:
        save_offload_index(offload_index, str(offload_folder))
    for alias, stored in aliases.items():
        _tie(model, alias, stored)
    left = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_meta and name not in offload_index
    ]
    if left:
        raise ModelLoadError(
            f"{_few(left)} of {type(model).__name__} got no value from the weights; a compressed "
            "module with non-persistent buffers cannot be rebuilt from its shell"
        )


def _device_of(name: str, devices: Mapping[str, Any]) -> Any:
    """The device of the longest module prefix of ``name`` in a device map."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in devices:
            return devices[prefix]
    raise KeyError(name)  # _resolve_device_map checked that every tensor is covered


def _resolve_device_map(
    model: nn.Module,
    device_map: str | Mapping[str, str | int | torch.device] | None,
    dtype: torch.dtype,
    offload_folder: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """A device map as ``{module prefix: device}`` that covers every tensor of ``model``."""
    if device_map is None:
        return {"": "cpu"}
    if device_map == "auto":
        from accelerate import infer_auto_device_map

        no_split = list(getattr(model, "_no_split_modules", None) or [])
        devices = dict(infer_auto_device_map(model, no_split_module_classes=no_split, dtype=dtype))
    elif isinstance(device_map, str | int | torch.device):
        devices = {"": device_map}
    else:
        devices = dict(device_map)
    modules = dict(model.named_modules())
    unknown = [name for name in devices if name not in modules]
    if unknown:
        raise InvalidOptionError(
            f"device_map names {_few(unknown)}, not modules of {type(model).__name__}; use "
            "module names as model.named_modules() gives them ('' for the whole model)"
        )
    uncovered = []
    for name in model.state_dict():
        try:
            _device_of(name, devices)
        except KeyError:
            uncovered.append(name)
    if uncovered:
        raise InvalidOptionError(
            f"device_map gives no device for {_few(uncovered)}; add their modules (or '' for "
            "everything not named)"
        )
    if "disk" in devices.values():
        if offload_folder is None:
            raise InvalidOptionError(
                'device_map sends modules to "disk"; pass offload_folder= a folder to write them to'
            )
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    for device in set(devices.values()) - {"disk"}:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidOptionError(
                f"device_map has {device!r}, not a device; use 'cpu', 'cuda:N', a GPU index or "
                "'disk'"
            ) from None
    return devices


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

    if getattr(getattr(model, "config", None), "laserrmt_modules", None):
        # Its layers are the folder code's, not registered ones: the save would lose them.
        raise ModelLoadError(
            f"{type(model).__name__} was loaded with a laserrmt folder's own code "
            "(trust_remote_code); load the folder with laserrmt.load to save it with laserrmt, "
            "or save it with model.save_pretrained"
        )
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
    model: nn.Module,
    folder: Path,
    tokenizer: Any | None,
    metadata: dict[str, Any],
    max_shard_size: int | None,
) -> None:
    """The folder's files; weights too unless ``max_shard_size`` is ``None``."""
    config = _hf_config(model)
    if config is not None:
        config.save_pretrained(folder)
        if metadata["modules"] or not _rebuilt_by_transformers(model, config):
            _mark_config(folder / CONFIG_FILE, metadata["modules"], _auto_classes(model, config))
            for code in HF_CODE_FILES:
                (folder / code).write_text(_hf_code(code), encoding="utf-8")
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(folder)
    if max_shard_size is not None:
        _write_weights(model, folder, max_shard_size)
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


def _mark_config(file: Path, modules: Mapping[str, Any], auto_classes: list[str]) -> None:
    """Give ``config.json`` a ``model_type`` transformers refuses, keeping the family's own, and
    point its ``auto_map`` at the modelling code written beside it (:mod:`.hf_code`)."""
    config = json.loads(file.read_text(encoding="utf-8"))
    config[BASE_MODEL_TYPE_KEY] = config["model_type"]
    config["model_type"] = MODEL_TYPE
    config["laserrmt_modules"] = modules
    config["auto_map"] = {
        "AutoConfig": "configuration_laserrmt.LaserRMTConfig",
        **{auto: "modeling_laserrmt.LaserRMTModel" for auto in auto_classes},
    }
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _auto_classes(model: nn.Module, config: Any) -> list[str]:
    """The transformers Auto classes that map this config type to the model's own class."""
    import transformers

    names = []
    for name in dir(transformers):
        if not name.startswith("AutoModel"):
            continue
        mapping = getattr(getattr(transformers, name), "_model_mapping", None)
        if mapping is None:
            continue
        try:
            if mapping[type(config)] is type(model):
                names.append(name)
        except (KeyError, ImportError, AttributeError):  # no such head for this family
            continue
    return names


def _hf_code(name: str) -> str:
    return resources.files("laserrmt.surgery.hf_code").joinpath(name).read_text(encoding="utf-8")


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


def _write_weights(model: nn.Module, folder: Path, max_shard_size: int) -> None:
    """Write the state dict once per distinct tensor, shard by shard; tied names go to the
    metadata."""
    stored, aliases = distinct_state(model)
    writer = ShardWriter(folder, max_shard_size)
    for alias, name in aliases.items():
        writer.alias(alias, name)
    for name, tensor in stored.items():
        writer.add(name, tensor)
    writer.close()


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
        # What only the folder's own modelling code reads (laserrmt.json holds the modules).
        data.pop("laserrmt_modules", None)
        data.pop("auto_map", None)
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


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
