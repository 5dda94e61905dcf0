"""A compressed Llama-style causal LM as one GGUF file, for llama.cpp and everything built on it.

GGUF can hold what a standard Llama config holds (see :mod:`laserrmt.export.hf`, whose dense
copy this writes): denoised weights, the residual-stream cut (``embedding_length``, with the
head size kept as ``rope.dimension_count``) and one MLP width for every block. The file
carries llama.cpp's ``llama`` architecture keys, the tokenizer's vocabulary and merges under
``tokenizer.ggml.*``, and the tensors under llama.cpp's names.

Two conventions differ from transformers and are converted here:

* Rotary embeddings. transformers rotates the first half of each head's query/key features
  against the second half (``rotate_half``); llama.cpp rotates adjacent pairs ``(2i, 2i+1)``.
  So the rows of ``q_proj`` and ``k_proj`` are reordered within each head: GGUF row ``2i + j``
  is transformers row ``j · head_dim/2 + i`` (``j`` ∈ {0, 1}), which makes the pairs that
  llama.cpp rotates the pairs transformers rotates. transformers' GGUF reader applies the
  inverse when loading.
* Tensor types. By default matrices are stored as F16 and the 1-D RMSNorm weights as F32 (the
  norms are tiny and their rounding would scale whole residual streams); ``dtype="float32"``
  or ``"bfloat16"`` choose F32 or BF16 matrices instead.

Only byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) are written; the file is checked by
reading it back with transformers' GGUF loader and comparing logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from laserrmt.errors import InvalidOptionError, NumericalError, TargetSelectionError
from laserrmt.export.common import write_report
from laserrmt.export.hf import _plan_modes, standard_copy
from laserrmt.outputs import atomic_output_dir, check_output_dir
from laserrmt.surgery.io import weight_bytes

__all__ = [
    "GGUF_DTYPES",
    "GGUF_FILE",
    "GGUF_TOLERANCE",
    "export_gguf",
    "gguf_package",
    "to_gguf_rotary_order",
]

GGUF_FILE = "model.gguf"
#: Matrix storage types; the first is the default. Norm weights are always F32.
GGUF_DTYPES = ("float16", "bfloat16", "float32")
#: Logits read back against the same weights rounded to the stored types, relative to the
#: largest logit when that exceeds 1.
GGUF_TOLERANCE = 1e-4

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# llama.cpp's token types (gguf.TokenType): a normal vocabulary entry, a special token, an
# added token matched whole but not special, and a slot beyond the tokenizer's vocabulary.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def gguf_package() -> Any:
    """The ``gguf`` module, or one line saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise InvalidOptionError(
            "GGUF export needs the gguf package; pip install 'laserrmt[gguf]'"
        ) from None
    return gguf


def to_gguf_rotary_order(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a query or key projection from transformers' rotary layout to
    llama.cpp's: within each head, row ``j · half + i`` moves to ``2i + j``.

    ``weight`` is ``[n_heads · head_dim, in]`` (or a bias ``[n_heads · head_dim]``).
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    if n_heads * 2 * half != rows:
        raise TargetSelectionError(
            f"a projection of {rows} rows does not split into {n_heads} heads of even size; "
            "llama.cpp's rotary layout needs an even head size"
        )
    tail = weight.shape[1:]
    return weight.reshape(n_heads, 2, half, *tail).transpose(1, 2).reshape(weight.shape)


def _refuse_unmapped(model: nn.Module) -> None:
    """One line for each Llama variant the ``llama`` GGUF keys cannot describe."""
    name = type(model).__name__
    config: Any = getattr(model, "config", None)
    if name != "LlamaForCausalLM" or getattr(config, "model_type", None) != "llama":
        raise TargetSelectionError(
            f"--format gguf writes Llama-style causal LMs (LlamaForCausalLM) only, not {name}; "
            "use --format hf and llama.cpp's convert_hf_to_gguf.py, or --format onnx"
        )
    unmapped = []
    if config.hidden_act != "silu":
        unmapped.append(f"hidden_act {config.hidden_act!r} (llama.cpp's llama uses silu)")
    if config.attention_bias or config.mlp_bias:
        unmapped.append("attention or MLP biases")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        unmapped.append(f"rope scaling {rope.get('rope_type')!r}")
    if unmapped:
        raise TargetSelectionError(
            f"this Llama has {'; '.join(unmapped)}, which the GGUF export does not map; "
            "use --format hf and llama.cpp's convert_hf_to_gguf.py, or --format onnx"
        )


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer we can describe, or None."""

    def byte_level(step: dict[str, Any]) -> bool:
        return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True))

    if pre is None:
        return None
    if byte_level(pre):
        return "gpt-2"
    steps = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and byte_level(steps[1])
    ):
        return "smollm"  # GPT-2's split after every digit is cut alone
    return None


def _tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values of a byte-level BPE tokenizer, padded to ``vocab_size``."""
    if tokenizer is None:
        raise TargetSelectionError(
            "the model folder has no tokenizer, and a GGUF file must carry one; save the "
            "tokenizer into the folder (tokenizer.save_pretrained) and export again"
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise TargetSelectionError(
            f"the tokenizer ({type(tokenizer).__name__}, {model.get('type', 'no fast model')}) "
            "is not a byte-level BPE tokenizer, the only kind the GGUF export writes; use "
            "--format hf and llama.cpp's convert_hf_to_gguf.py"
        )
    if not model.get("merges"):
        raise TargetSelectionError(
            "the tokenizer's BPE has no merges, and a GGUF byte-level vocabulary must list "
            "them; use --format hf or --format onnx"
        )
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise TargetSelectionError(
            f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's "
            f"{vocab_size} embeddings; the tokenizer does not belong to this model"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, _NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = _CONTROL if added.special else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = tokenizer("a")["input_ids"]
    fields: dict[str, Any] = {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "add_bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id],
        "chat_template": tokenizer.chat_template
        if isinstance(tokenizer.chat_template, str)
        else None,
    }
    for key in ("bos", "eos", "unk", "pad"):
        fields[key] = getattr(tokenizer, f"{key}_token_id", None)
    return fields


def _write_metadata(writer: Any, config: Any, tokens: dict[str, Any], name: str) -> None:
    writer.add_name(name)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    # The head size survives a residual-stream cut, so it is stated rather than implied by
    # embedding_length / head_count (llama.cpp reads key_length, transformers the rope key).
    head_dim = int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokens["pre"])
    writer.add_token_list(tokens["tokens"])
    writer.add_token_types(tokens["types"])
    writer.add_token_merges(tokens["merges"])
    for key in ("bos", "eos", "unk", "pad"):
        if tokens[key] is not None:
            getattr(writer, f"add_{key}_token_id")(int(tokens[key]))
    writer.add_add_bos_token(bool(tokens["add_bos"]))
    writer.add_add_eos_token(bool(tokens["add_eos"]))
    if tokens["chat_template"]:
        writer.add_chat_template(tokens["chat_template"])


def _gguf_tensors(dense: Any, dtype: str) -> list[tuple[str, torch.Tensor]]:
    """``(GGUF name, tensor in its stored dtype)`` for every weight, in llama.cpp's layout."""
    import gguf

    config = dense.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    state = dense.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # a GGUF without output.weight ties the head
    heads = {
        "self_attn.q_proj": int(config.num_attention_heads),
        "self_attn.k_proj": int(config.num_key_value_heads),
    }
    tensors = []
    for key, value in state.items():
        base, _, suffix = key.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise TargetSelectionError(f"{key} has no llama.cpp tensor name; use --format onnx")
        tensor = value.detach().float()
        for part, n_heads in heads.items():
            if base.endswith(part):
                tensor = to_gguf_rotary_order(tensor, n_heads)
        stored = _TORCH_DTYPES[dtype] if tensor.dim() > 1 else torch.float32
        tensors.append((f"{gguf_name}.{suffix}", tensor.to(stored)))
    return tensors


def _add_tensor(writer: Any, name: str, tensor: torch.Tensor) -> None:
    import gguf

    host = tensor.detach().cpu().contiguous()
    if host.dtype == torch.bfloat16:
        # numpy has no bfloat16: the raw 16-bit patterns go in, typed BF16.
        raw = host.view(torch.int16).numpy().view(np.uint16)
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        writer.add_tensor(name, host.numpy())


def _rounded_reference(dense: Any, dtype: str) -> nn.Module:
    """The dense copy in float32 with every matrix rounded to the stored dtype."""
    reference = dense.float()
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.dim() > 1:
                parameter.copy_(parameter.to(_TORCH_DTYPES[dtype]).float())
    return reference


def export_gguf(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any | None,
    dtype: str = GGUF_DTYPES[0],
    overwrite: bool = False,
    source_folder: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write ``model`` (a Llama-style causal LM, compressed or not) as ``out/model.gguf``.

    Compressed layers are made dense as for ``--format hf``; matrices are stored as ``dtype``
    (norms as float32). The file is read back with transformers' GGUF loader; its logits must
    match those of the same weights rounded to the stored types to ``GGUF_TOLERANCE``, and the
    report (``export.json``) also gives the difference from ``model`` itself, which is the
    rounding to ``dtype``. ``model`` is not changed.

    Raises:
        InvalidOptionError: an unknown ``dtype``.
        TargetSelectionError: an architecture, tokenizer, layer or width the file cannot hold.
        NumericalError: transformers reads the file back with different logits.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    from transformers import AutoModelForCausalLM

    gguf = gguf_package()
    if dtype not in GGUF_DTYPES:
        raise InvalidOptionError(f"unknown GGUF dtype {dtype!r}; choose {', '.join(GGUF_DTYPES)}")
    _refuse_unmapped(model)
    check_output_dir(out, overwrite)
    dense, counts, mlp_width = standard_copy(model)
    config = dense.config
    tokens = _tokenizer_fields(tokenizer, int(config.vocab_size))
    tensors = _gguf_tensors(dense, dtype)
    ids = torch.randint(
        0, int(config.vocab_size), (2, 16), generator=torch.Generator().manual_seed(0)
    )
    device = next(model.parameters()).device
    with torch.no_grad():
        expected = model(input_ids=ids.to(device)).logits.float().cpu()
        rounded = _rounded_reference(dense, dtype)(input_ids=ids).logits
    with atomic_output_dir(out, overwrite=overwrite) as folder:
        writer = gguf.GGUFWriter(folder / GGUF_FILE, "llama")
        _write_metadata(writer, config, tokens, f"laserrmt export of {type(model).__name__}")
        writer.add_file_type(
            {
                "float32": gguf.LlamaFileType.ALL_F32,
                "float16": gguf.LlamaFileType.MOSTLY_F16,
                "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
            }[dtype]
        )
        for name, tensor in tensors:
            _add_tensor(writer, name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        reloaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=GGUF_FILE, dtype=torch.float32
        ).eval()
        with torch.no_grad():
            logits = reloaded(input_ids=ids).logits
        diff = float((logits - rounded).abs().max())
        tolerance = GGUF_TOLERANCE * max(1.0, float(rounded.abs().max()))
        if not diff <= tolerance:
            raise NumericalError(
                f"transformers reads the GGUF file with logits {diff:.3g} off the same weights "
                f"in torch (allowed {tolerance:.3g}); please report it"
            )
        modes = _plan_modes(Path(source_folder) if source_folder is not None else None)
        survives = [f"embedding_length {config.hidden_size} (the residual stream as saved)"]
        if modes.get("denoise"):
            survives.insert(0, f"denoise of {modes['denoise']} layers (same shapes)")
        if mlp_width is not None:
            survives.append(f"feed_forward_length {mlp_width} in every block")
        lost = []
        if counts["factorized"]:
            lost.append(f"factors of {counts['factorized']} layers multiplied back")
        if counts["int8"]:
            lost.append(f"int8 of {counts['int8']} layers dequantized")
        report: dict[str, Any] = {
            "format": "gguf",
            "file": GGUF_FILE,
            "dtype": dtype,
            "architecture": "llama",
            "survives": survives,
            "lost": lost,
            "layers_densified": counts,
            "source_weight_bytes": weight_bytes(model),
            "gguf_bytes": (folder / GGUF_FILE).stat().st_size,
            "check": {
                "max_abs_logit_diff_vs_same_weights": diff,
                "tolerance": tolerance,
                "max_abs_logit_diff_vs_laserrmt": float((logits - expected).abs().max()),
            },
        }
        write_report(folder, report)
    return report
