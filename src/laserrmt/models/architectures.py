"""How model families name their modules: the one place that knows it.

Everything else in laserrmt asks this module two questions about a dotted module name (as
given by ``model.named_modules()``): which transformer block it belongs to
(:func:`block_index`) and what it does there (:func:`module_role`). A third,
:func:`is_embedding_or_head`, says whether a module sits at the model's input or output,
where rank reduction is excluded unless asked for. For width reduction
(:mod:`laserrmt.surgery.width`) it also says which layers compute a hidden width and which read
it: :func:`mlp_layouts`, :func:`channel_chains`, :func:`encoder_self_attentions` and
:func:`residual_layout`.

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
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import nn

from laserrmt.errors import TargetSelectionError

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


# ---------------------------------------------------------------------------------------------
# Widths: which modules compute a hidden width and which read it (for laserrmt.surgery.width)


@dataclass(frozen=True)
class UnitLayout:
    """Layers that compute a hidden width unit by unit, and the layer that reads it.

    A transformer MLP (:func:`mlp_layouts`): ``name`` is its block (``model.layers.3``),
    ``producers`` are ``(gate, up)`` of a gated MLP or ``(fc_in,)`` of a plain one, ``consumer``
    is ``down`` or ``fc_out``. A CNN chain (:func:`channel_chains`): ``name`` is the convolution,
    ``followers`` the BatchNorm layers over its channels, ``consumer`` the layer reading them.
    """

    name: str
    producers: tuple[str, ...]
    consumer: str
    width: int
    """The number of units (hidden neurons, channels)."""
    followers: tuple[str, ...] = ()


def mlp_layouts(model: nn.Module) -> list[UnitLayout]:
    """Every block's MLP whose layers are ``nn.Linear`` with recognised roles, in module order."""
    by_block: dict[str, dict[str, str]] = {}
    for name, module in model.named_modules():
        role = module_role(name)
        match = _BLOCK.search(name)
        if match is None or role is None or not role.startswith("mlp."):
            continue
        if not isinstance(module, nn.Linear):
            continue
        by_block.setdefault(name[: match.end(1)].lstrip("."), {})[role] = name
    layouts = []
    for block, roles in by_block.items():
        producers: tuple[str, ...]
        if {"mlp.gate", "mlp.up", "mlp.down"} <= roles.keys():
            producers, consumer = (roles["mlp.gate"], roles["mlp.up"]), roles["mlp.down"]
        elif {"mlp.fc_in", "mlp.fc_out"} <= roles.keys():
            producers, consumer = (roles["mlp.fc_in"],), roles["mlp.fc_out"]
        else:
            continue
        reader = model.get_submodule(consumer)
        assert isinstance(reader, nn.Linear)  # only nn.Linear entered by_block
        layouts.append(UnitLayout(block, producers, consumer, int(reader.in_features)))
    return layouts


def channel_chains(model: nn.Module) -> list[UnitLayout]:
    """Plain CNN chains: each ``Conv2d`` (groups = 1) and the next layer in registration order.

    After optional ``BatchNorm2d`` layers over the same channels, the next ``Conv2d`` or
    ``Linear`` is taken to read the convolution's output: a ``Conv2d`` with exactly those input
    channels, or a ``Linear`` reading them flattened. That holds for ``nn.Sequential``-style
    networks (LeNet, VGG), **not** for networks with skip connections (ResNet), where a
    convolution's output has several readers. Heads are included: a classifier can read the last
    convolution.
    """
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d)
    ]
    chains = []
    for i, (name, module) in enumerate(layers):
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            continue
        channels = module.out_channels
        followers: list[str] = []
        j = i + 1
        while j < len(layers):
            follower = layers[j][1]
            if not isinstance(follower, nn.BatchNorm2d) or follower.num_features != channels:
                break
            followers.append(layers[j][0])
            j += 1
        if j >= len(layers):
            continue
        consumer_name, consumer = layers[j]
        fits = (
            isinstance(consumer, nn.Conv2d)
            and consumer.groups == 1
            and consumer.in_channels == channels
        ) or (isinstance(consumer, nn.Linear) and consumer.in_features % channels == 0)
        if fits:
            chains.append(UnitLayout(name, (name,), consumer_name, channels, tuple(followers)))
    return chains


@dataclass
class ResidualLayout:
    """The layers of a pre-RMSNorm decoder that touch the residual stream."""

    width: int
    embedding: nn.Embedding
    head: nn.Linear | None
    """The output embedding, when it is an ``nn.Linear``."""
    final_norm: nn.Module
    norms: list[tuple[nn.Module, list[nn.Linear]]]
    """(norm, readers of its output): ``input_layernorm`` → q/k/v, ``post_attention_layernorm``
    → gate/up."""
    writers: list[nn.Linear]
    """The layers that add into the stream: ``o_proj``, ``down_proj``."""
    blocks: nn.ModuleList
    config: Any


RESIDUAL_FAMILIES: Final = frozenset({"llama", "mistral", "qwen2"})
"""``model_type`` values whose residual stream :func:`residual_layout` can describe."""


def residual_layout(model: nn.Module) -> ResidualLayout:
    """The Llama family's residual stream: ``model.embed_tokens``, ``model.layers[i]`` with
    ``input_layernorm`` → ``self_attn.{q,k,v}_proj``, ``self_attn.o_proj``,
    ``post_attention_layernorm`` → ``mlp.{gate,up}_proj``, ``mlp.down_proj``; ``model.norm``;
    the output embedding.

    Raises:
        TargetSelectionError: the model is not of a family in :data:`RESIDUAL_FAMILIES`.
    """
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in RESIDUAL_FAMILIES or inner is None or layers is None:
        raise TargetSelectionError(
            "residual-stream slicing supports pre-RMSNorm decoders "
            f"({', '.join(sorted(RESIDUAL_FAMILIES))}); {type(model).__name__} (model_type "
            f"{model_type!r}) is not one: cut its MLP width instead"
        )
    norms: list[tuple[nn.Module, list[nn.Linear]]] = []
    writers: list[nn.Linear] = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        norms.append((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]))
        norms.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
        writers += [attn.o_proj, mlp.down_proj]
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    return ResidualLayout(
        width=int(inner.embed_tokens.embedding_dim),
        embedding=inner.embed_tokens,
        head=head if isinstance(head, nn.Linear) else None,
        final_norm=inner.norm,
        norms=norms,
        writers=writers,
        blocks=layers,
        config=config,
    )


@dataclass(frozen=True)
class SelfAttentionLayout:
    """A BERT-style encoder self-attention: the module holding q/k/v and its output projection."""

    self_name: str
    output_name: str
    heads: int
    qk_head_size: int
    v_head_size: int
    scaling: float
    dropout: float


def encoder_self_attentions(model: nn.Module) -> list[SelfAttentionLayout]:
    """The BERT family's encoder attention, block by block.

    ``<block>.attention.self`` holds ``query``, ``key`` and ``value`` (``nn.Linear``, heads
    concatenated head-major in the output dimension), ``num_attention_heads`` and
    ``attention_head_size``; ``<block>.attention.output.dense`` reads the concatenated heads.
    A module that states its own ``qk_head_size``, ``v_head_size``, ``scaling`` and
    ``dropout_p`` (one laserrmt has already narrowed) is described by those. Decoder attention
    (a cache, a causal mask) is not listed.
    """
    layouts = []
    for name, module in model.named_modules():
        if not name.endswith("attention.self"):
            continue
        if not all(
            isinstance(getattr(module, p, None), nn.Linear) for p in ("query", "key", "value")
        ):
            continue
        if getattr(module, "is_decoder", False) or getattr(module, "is_causal", False):
            continue
        output_name = name[: -len("self")] + "output.dense"
        try:
            output = model.get_submodule(output_name)
        except AttributeError:
            continue
        if not isinstance(output, nn.Linear):
            continue
        heads = int(module.num_attention_heads)
        if hasattr(module, "qk_head_size"):
            qk = int(module.qk_head_size)
            v = int(module.v_head_size)
            scaling = float(module.scaling)
            dropout = float(module.dropout_p)
        else:
            qk = v = int(module.attention_head_size)
            scaling = float(getattr(module, "scaling", qk**-0.5))
            dropout_module = getattr(module, "dropout", None)
            dropout = float(dropout_module.p) if isinstance(dropout_module, nn.Dropout) else 0.0
        layouts.append(SelfAttentionLayout(name, output_name, heads, qk, v, scaling, dropout))
    return layouts
