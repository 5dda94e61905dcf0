"""Tiny, seeded, randomly initialised models for fast tests.

Every builder returns a float32 model in eval mode, built from transformers' own config
classes so module names and layer types are exactly those of the real families: 2 blocks,
hidden size 32-64, a vocabulary of :data:`TINY_VOCAB_SIZE` tokens. Seeds are applied inside a
forked RNG, so building a model never disturbs the caller's random state.

:func:`tiny_tokenizer` is a byte-level tokenizer built in memory (no download) whose ids fit
every tiny model's vocabulary, so tiny models can run end-to-end on real text.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

# 256 byte tokens plus an end-of-text token, padded up to a multiple of 8.
TINY_VOCAB_SIZE = 264
EOS_TOKEN = "<|endoftext|>"

M = TypeVar("M", bound=nn.Module)


def _seeded(seed: int, build: Callable[[], M]) -> M:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(torch.float32).eval()


def tiny_llama(seed: int = 0, *, tie_word_embeddings: bool = True, **overrides: Any) -> nn.Module:
    """A 2-block ``LlamaForCausalLM`` (hidden 64, MLP 128, 4 heads / 2 KV heads).

    The head is tied to the input embedding by default, as in SmolLM2.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )
    return _seeded(seed, lambda: LlamaForCausalLM(config))


def tiny_gemma(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-block ``GemmaForCausalLM`` (hidden 64, MLP 128, head dim 16; tied head)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        **overrides,
    )
    return _seeded(seed, lambda: GemmaForCausalLM(config))


def tiny_qwen2(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-block ``Qwen2ForCausalLM`` (hidden 64, MLP 128; q/k/v carry biases; untied head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **overrides,
    )
    return _seeded(seed, lambda: Qwen2ForCausalLM(config))


def tiny_gpt2(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-block ``GPT2LMHeadModel`` (hidden 64, 4 heads); its layers are HF ``Conv1D``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=TINY_VOCAB_SIZE,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=TINY_VOCAB_SIZE - 8,
        eos_token_id=TINY_VOCAB_SIZE - 8,
        **overrides,
    )
    return _seeded(seed, lambda: GPT2LMHeadModel(config))


def tiny_bert(num_labels: int | None = None, seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-block BERT encoder (hidden 32, FFN 64, 4 heads).

    ``BertModel`` when ``num_labels`` is ``None``, else ``BertForSequenceClassification``.
    """
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        **overrides,
    )
    if num_labels is None:
        return _seeded(seed, lambda: BertModel(config))
    config.num_labels = num_labels
    return _seeded(seed, lambda: BertForSequenceClassification(config))


class TinyCNN(nn.Module):
    """Two 3×3 convolutions and a two-layer classifier for 1×8×8 images (UCI digits)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 32),
            nn.ReLU(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def tiny_cnn(seed: int = 0, num_classes: int = 10) -> TinyCNN:
    """A :class:`TinyCNN` (Conv2d 1→8, Conv2d 8→16, Linear 256→32, Linear 32→classes)."""
    return _seeded(seed, lambda: TinyCNN(num_classes))


def tiny_tokenizer() -> Any:
    """A byte-level ``PreTrainedTokenizerFast`` built in memory: 256 byte tokens + EOS.

    Every string round-trips through ``encode``/``decode``; ids are below 257, so they fit
    :data:`TINY_VOCAB_SIZE`. EOS doubles as padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab[EOS_TOKEN] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def save_tiny(model: nn.Module, folder: str | Path, tokenizer: Any | None = None) -> Path:
    """Save a tiny model (and optionally its tokenizer) with ``save_pretrained``."""
    folder = Path(folder)
    model.save_pretrained(folder)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
