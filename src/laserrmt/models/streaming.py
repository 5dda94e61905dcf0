"""A model skeleton whose weights come from a checkpoint one part at a time.

:class:`BlockStream` builds the model a checkpoint's config describes on the meta device (no
weight memory), then materialises parts of it from the :class:`~laserrmt.models.checkpoint.
Checkpoint` on demand and frees them back to meta: one target matrix (weight-only analysis),
one transformer block, or the parts outside the blocks (embeddings, final norm, head). Peak
memory is then one part plus what the caller keeps, whatever the model's size.

Skeleton names are the model's parameter names; :func:`checkpoint_names` maps each to the
checkpoint tensor that holds it (a head tied to the embedding reads the embedding's tensor, and
a checkpoint saved from the base model lacks the ``base_model_prefix`` the task model adds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from laserrmt.errors import ModelLoadError
from laserrmt.memory import map_large_allocations, return_freed_memory
from laserrmt.models.architectures import block_index
from laserrmt.models.checkpoint import Checkpoint, empty_model


def checkpoint_names(model: nn.Module, checkpoint: Checkpoint) -> tuple[dict[str, str], list[str]]:
    """Model tensor name → checkpoint tensor name, and the model tensors the checkpoint lacks.

    Covers every parameter (tied ones under each of their names) and every persistent buffer
    the checkpoint holds; buffers it lacks are computed from the config and stay as built.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    by_identity: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(param), []).append(name)

    def resolve(name: str) -> str | None:
        candidates = [name]
        if prefix and name.startswith(f"{prefix}."):
            candidates.append(name.removeprefix(f"{prefix}."))
        elif prefix:
            candidates.append(f"{prefix}.{name}")
        return next((c for c in candidates if c in checkpoint), None)

    mapping: dict[str, str] = {}
    missing: list[str] = []
    for names in by_identity.values():
        found = next((r for r in map(resolve, names) if r is not None), None)
        for name in names:
            if found is None:
                missing.append(name)
            else:
                mapping[name] = resolve(name) or found
    for name, _ in model.named_buffers(remove_duplicate=False):
        found = resolve(name)
        if found is not None:
            mapping[name] = found
    return mapping, sorted(missing)


def block_prefixes(model: nn.Module) -> list[str]:
    """The module names of the transformer blocks, in order (``model.layers.0``, ...)."""
    prefixes: dict[int, str] = {}
    for name, _ in model.named_modules():
        parent, _, last = name.rpartition(".")
        if last.isdigit() and block_index(name) == int(last) and block_index(parent) is None:
            prefixes.setdefault(int(last), name)
    return [prefixes[i] for i in sorted(prefixes)]


class BlockStream:
    """A meta-device skeleton of ``checkpoint``'s model, materialised one part at a time.

    ``device`` and ``dtype`` are where and as what materialised tensors live (``dtype=None``:
    the skeleton's own, float32). ``source`` describes the model for reports; like
    :func:`~laserrmt.models.loading.load_model`, a checkpoint that holds the base model's
    weights but not its head's is read as the base model, and ``source`` says so.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        task: str = "auto",
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        map_large_allocations()
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = checkpoint.source
        model = empty_model(checkpoint.config, task=task, trust_remote_code=trust_remote_code)
        names, missing = checkpoint_names(model, checkpoint)
        prefix = getattr(model, "base_model_prefix", "") or ""
        headless = bool(missing) and bool(prefix) and hasattr(model, prefix)
        headless = headless and not any(m.startswith(f"{prefix}.") for m in missing)
        if headless and task == "auto":
            head = type(model).__name__
            model = empty_model(checkpoint.config, task="base", trust_remote_code=trust_remote_code)
            names, missing = checkpoint_names(model, checkpoint)
            self.source += f" (as {type(model).__name__}: the checkpoint has no weights for the head of {head})"
        if missing:
            raise ModelLoadError(
                f"{checkpoint.source} lacks weights for {len(missing)} parameter(s) of "
                f"{type(model).__name__} (e.g. {missing[0]}); the checkpoint does not match its "
                "config.json: copy or save the model again"
            )
        self.model = model
        self.names = names
        self.blocks = block_prefixes(model)

    def tensors_under(self, prefixes: Sequence[str]) -> list[str]:
        """The model's tensor names (checkpoint-backed) below any of the module ``prefixes``."""
        heads = tuple(f"{p}." if p else "" for p in prefixes)
        return [name for name in self.names if name.startswith(heads)]

    def outer_tensors(self) -> list[str]:
        """The tensors outside every block: embeddings, final norm, head."""
        inside = set(self.tensors_under(self.blocks))
        return [name for name in self.names if name not in inside]

    def load(self, names: Sequence[str]) -> None:
        """Read ``names`` from the checkpoint into the skeleton, on ``device`` as ``dtype``."""
        from accelerate.utils import set_module_tensor_to_device

        # Names read from one checkpoint tensor (a tied head) share the one copy read.
        loaded: dict[str, torch.Tensor] = {}
        for name in names:
            owner, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(owner)
            source = self.names[name]
            if source in loaded:
                slots = module._parameters if leaf in module._parameters else module._buffers
                slots[leaf] = loaded[source]  # type: ignore[assignment]
                continue
            value = self.checkpoint.get(source)
            dtype = self.dtype if value.is_floating_point() else None
            set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=dtype)
            loaded[source] = getattr(module, leaf)

    def free(self, names: Sequence[str]) -> None:
        """Return ``names`` to the meta device (their memory is released)."""
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(self.model, name, "meta")
        return_freed_memory()  # what the freed part's work left in the heap

    @contextmanager
    def materialized(self, prefixes: Sequence[str]) -> Iterator[None]:
        """The tensors of the modules named by ``prefixes`` are real inside the block."""
        names = self.tensors_under(prefixes)
        self.load(names)
        try:
            yield
        finally:
            self.free(names)

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Transformer block ``index``, materialised, and freed when the block ends."""
        prefix = self.blocks[index]
        with self.materialized([prefix]):
            yield self.model.get_submodule(prefix)

    @contextmanager
    def outer(self) -> Iterator[nn.Module]:
        """The model with everything outside the blocks materialised."""
        names = self.outer_tensors()
        self.load(names)
        try:
            yield self.model
        finally:
            self.free(names)

    def run_blocks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states (after the final norm) of a Llama-style decoder, computed
        block by block: only one block's weights are real at a time.

        Follows the decoder's own call convention (causal mask, rotary position embeddings);
        supported for models whose base model has ``embed_tokens``, ``rotary_emb``, ``layers``
        and ``norm`` (Llama, Mistral, Qwen2 and their kin).
        """
        from transformers.masking_utils import create_causal_mask

        base: Any = getattr(self.model, getattr(self.model, "base_model_prefix", ""), self.model)
        needed = ("embed_tokens", "rotary_emb", "layers", "norm")
        if not all(hasattr(base, part) for part in needed):
            raise ModelLoadError(
                f"run_blocks supports Llama-style decoders ({', '.join(needed)}); "
                f"{type(self.model).__name__} is not one"
            )
        input_ids = input_ids.to(self.device)
        with torch.no_grad():
            embed = self.prefix_of(base.embed_tokens)
            with self.materialized([embed]):
                hidden = base.embed_tokens(input_ids)
            position_ids = torch.arange(hidden.shape[1], device=self.device).unsqueeze(0)
            mask = create_causal_mask(
                config=base.config,
                inputs_embeds=hidden,
                attention_mask=None,
                cache=None,
                position_ids=position_ids,
            )
            rotary = base.rotary_emb.to(self.device)
            position_embeddings = rotary(hidden, position_ids=position_ids)
            for index in range(len(self.blocks)):
                with self.block(index) as layer:
                    hidden = layer(
                        hidden,
                        attention_mask=mask,
                        position_embeddings=position_embeddings,
                        position_ids=position_ids,
                    )
            with self.materialized([self.prefix_of(base.norm)]):
                hidden = base.norm(hidden)
        return hidden

    def prefix_of(self, module: nn.Module) -> str:
        """The full module name of a submodule of the skeleton."""
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise ValueError(f"{type(module).__name__} is not part of the model")
