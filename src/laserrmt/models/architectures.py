"""How model families name their modules: the one place that knows it.

Everything else in laserrmt asks this module two questions about a dotted module name (as
given by ``model.named_modules()``): which transformer block it belongs to
(:func:`block_index`) and what it does there (:func:`module_role`). A third,
:func:`is_embedding_or_head`, says whether a module sits at the model's input or output,
where rank reduction is excluded unless asked for.

Role vocabulary
---------------
A role is ``<sublayer>.<part>``. The sublayer is one of

``attn``
    self-attention;
``xattn``
    cross-attention (encoder–decoder attention), kept apart because its keys and values read
    the encoder's output rather than the residual stream;
``mlp``
    the position-wise feed-forward network.

and the part is one of

========== ==========================================================================
``q``      query projection (attention only)
``k``      key projection
``v``      value projection
``qkv``    the three fused in one matrix (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, Falcon
           ``query_key_value``)
``o``      output projection back to the residual stream
``gate``   gated MLP (SwiGLU/GeGLU, Llama ``gate_proj``): the branch passed through the
           activation
``up``     gated MLP: the linear branch multiplied with the gate
``gate_up`` gate and up fused in one matrix (Phi-3 ``gate_up_proj``)
``down``   gated MLP: the projection back to the residual stream
``fc_in``  plain (non-gated) MLP: the expanding layer (BERT ``intermediate.dense``, GPT-2
           ``mlp.c_fc``, OPT ``fc1``)
``fc_out`` plain MLP: the contracting layer (BERT ``output.dense``, GPT-2 ``mlp.c_proj``)
========== ==========================================================================

Gated and plain MLPs keep different names on purpose: ``mlp.down`` and ``mlp.fc_out`` are
both the contracting layer, but the input of ``down`` is a product of two branches while the
input of ``fc_out`` is one activation, and their spectra are not comparable. Select both with
the pattern ``role:mlp.*``. A module that none of the families below describes has role
``None`` (the generic fallback: it is still a target, found by its type).
"""

from __future__ import annotations

import re
from typing import Final

import torch
from torch import nn

ROLES: Final[tuple[str, ...]] = (
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.qkv",
    "attn.o",
    "xattn.q",
    "xattn.k",
    "xattn.v",
    "xattn.qkv",
    "xattn.o",
    "mlp.gate",
    "mlp.up",
    "mlp.gate_up",
    "mlp.down",
    "mlp.fc_in",
    "mlp.fc_out",
)
"""Every role :func:`module_role` can return."""

# The first `<container>.<index>` in a name is its block: nested indices further in (T5's
# `block.0.layer.1`) number sublayers, not blocks. Encoder and decoder blocks of an
# encoder–decoder model share indices; the name tells them apart.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

_SELF_ATTN = r"(?:self_attn|self_attention|attn|attention|SelfAttention|self)"
_CROSS_ATTN = r"(?:encoder_attn|crossattention|cross_attn|cross_attention|EncDecAttention)"
_MLP = r"(?:mlp|feed_forward|ffn|ff|DenseReluDense)"


def _table(attn: str, prefix: str) -> list[tuple[str, str]]:
    return [
        (rf"{attn}\.(?:q_proj|query|q|wq|to_q)", f"{prefix}.q"),
        (rf"{attn}\.(?:k_proj|key|k|wk|to_k)", f"{prefix}.k"),
        (rf"{attn}\.(?:v_proj|value|v|wv|to_v)", f"{prefix}.v"),
        (
            rf"{attn}\.(?:c_attn|qkv_proj|query_key_value|Wqkv|qkv|in_proj|q_attn_kv)",
            f"{prefix}.qkv",
        ),
        (rf"{attn}\.(?:o_proj|out_proj|dense|c_proj|wo|o|proj|to_out(?:\.0)?)", f"{prefix}.o"),
        # BERT, ViT: the attention output projection lives in `attention.output.dense`.
        (rf"{attn}\.output\.dense", f"{prefix}.o"),
    ]


# Ordered (regex on the end of the name, role) pairs; the first match wins. Order matters
# where a short name is shared: GPT-2 has `attn.c_proj` and `mlp.c_proj`, BERT has
# `attention.output.dense` and a bare `output.dense`.
_ROLE_TABLE: Final[list[tuple[re.Pattern[str], str]]] = [
    (re.compile(rf"(?:^|\.){pattern}$"), role)
    for pattern, role in [
        # Cross-attention first: BART's `encoder_attn.q_proj` must not read as self-attention.
        *_table(_CROSS_ATTN, "xattn"),
        *_table(_SELF_ATTN, "attn"),
        # Gated MLPs: Llama, Mistral, Qwen2, Gemma (`gate_proj`, `up_proj`, `down_proj`),
        # Mixtral/Mistral reference code (`w1` gate, `w3` up, `w2` down), T5 v1.1 (`wi_0`, `wi_1`).
        (rf"{_MLP}\.(?:gate_proj|w1|wi_0)", "mlp.gate"),
        (rf"{_MLP}\.(?:up_proj|w3|wi_1)", "mlp.up"),
        (rf"{_MLP}\.(?:gate_up_proj)", "mlp.gate_up"),
        (rf"{_MLP}\.(?:down_proj|w2)", "mlp.down"),
        # Plain MLPs: GPT-2 (`c_fc`, `c_proj`), GPT-J (`fc_in`, `fc_out`), GPT-NeoX
        # (`dense_h_to_4h`, `dense_4h_to_h`), CLIP/Phi (`fc1`, `fc2`), T5 (`wi`, `wo`).
        (rf"{_MLP}\.(?:c_fc|fc1|fc_in|dense_h_to_4h|wi|lin1)", "mlp.fc_in"),
        (rf"{_MLP}\.(?:c_proj|fc2|fc_out|dense_4h_to_h|wo|lin2)", "mlp.fc_out"),
        # OPT and BART put fc1/fc2 directly in the block.
        (r"\d+\.fc1", "mlp.fc_in"),
        (r"\d+\.fc2", "mlp.fc_out"),
        # BERT, RoBERTa, ViT: `intermediate.dense` expands, the block's own `output.dense`
        # contracts (the attention's `output.dense` matched above).
        (r"intermediate\.dense(?:_act)?", "mlp.fc_in"),
        (r"\d+\.output\.dense", "mlp.fc_out"),
    ]
]

# Output heads across families. A module with one of these names is a head (`lm_head`,
# `classifier`); inside a container with one of these names only the last matrix is (RoBERTa's
# `classifier.dense` is a hidden layer, `classifier.out_proj` the head; VGG-style CNNs keep
# their large hidden layers in `classifier.0`, `classifier.3`). Everything below BERT's `cls`
# (masked-LM and next-sentence heads) is head.
_HEAD_NAMES = frozenset(
    {
        "lm_head",
        "embed_out",
        "classifier",
        "score",
        "qa_outputs",
        "head",
        "output_projection",
        "vocab_projector",
    }
)
_HEAD_SUBTREES = frozenset({"cls"})


def block_index(name: str) -> int | None:
    """The index of the transformer block a module belongs to, or ``None`` outside blocks.

    Recognises the containers families use for their block lists: ``model.layers.3.``
    (Llama, Mistral, Qwen2, Gemma, OPT), ``transformer.h.3.`` (GPT-2), ``encoder.layer.3.``
    (BERT), ``blocks.3`` and ``block.3`` (ViT-style, T5).
    """
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def module_role(name: str) -> str | None:
    """The role of a module in its block (one of :data:`ROLES`), or ``None`` if unknown."""
    for pattern, role in _ROLE_TABLE:
        if pattern.search(name):
            return role
    return None


def is_embedding_or_head(name: str, module: nn.Module, model: nn.Module) -> bool:
    """Whether ``module`` is an input embedding or an output head of ``model``.

    Embeddings (``nn.Embedding``) are lookup tables, never weight matrices applied to
    activations. Output heads are excluded from rank reduction by default because every logit
    reads through them: a head is the model's declared output embedding
    (``get_output_embeddings``), a module named like one (``lm_head``, ``classifier``,
    ``score``, ``cls.predictions...``), or any layer whose weight is the same tensor as an
    input embedding (tied weights, where cutting the head would also cut the embedding).
    """
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return True
    if _named_like_head(name, module, model):
        return True
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            output = get_output()
        except (AttributeError, NotImplementedError):
            output = None
        if output is module:
            return True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    return any(_shares_storage(weight, emb.weight) for emb in _input_embeddings(model))


def _named_like_head(name: str, module: nn.Module, model: nn.Module) -> bool:
    parts = name.split(".")
    if parts[-1] in _HEAD_NAMES or any(part in _HEAD_SUBTREES for part in parts):
        return True
    for depth in range(len(parts) - 1, 0, -1):
        if parts[depth - 1] in _HEAD_NAMES:
            container = model.get_submodule(".".join(parts[:depth]))
            matrices = [m for m in container.modules() if _holds_matrix(m)]
            return bool(matrices) and matrices[-1] is module
    return False


def _holds_matrix(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() >= 2
        and not isinstance(module, nn.Embedding | nn.EmbeddingBag)
    )


def _input_embeddings(model: nn.Module) -> list[nn.Embedding]:
    """Every embedding table in the model (tied heads may point at any of them)."""
    return [m for m in model.modules() if isinstance(m, nn.Embedding)]


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    # Meta tensors have no storage to compare; tying on them is only visible as identity.
    if a.device.type == "meta" or b.device.type == "meta":
        return False
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts next tokens (so a language-model loss exists for it)."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False
