"""Lazy checkpoints, weight-only streaming analysis and the block-by-block skeleton.

Every check compares against the model that wrote the checkpoint (its own state dict and
forward pass), never against the streaming code's own output.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from laserrmt.analyze import analyze_checkpoint, analyze_model, write_analysis
from laserrmt.cli import main
from laserrmt.errors import ModelLoadError
from laserrmt.models.checkpoint import open_checkpoint, readable_lazily
from laserrmt.models.loading import load_model
from laserrmt.models.streaming import BlockStream
from tests.tiny_models import save_tiny, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2


def saved(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder


def stored_tensors(model):
    """The tensors save_pretrained writes: the state dict without tied duplicates."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    return {k: v for k, v in model.state_dict().items() if k not in tied}


# --------------------------------------------------------------------------- Checkpoint


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_checkpoint_reads_every_tensor_as_stored(tmp_path, shard):
    model = tiny_qwen2()
    folder = saved(model, tmp_path / "m", **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
    checkpoint = open_checkpoint(folder)
    expected = stored_tensors(model)
    assert sorted(checkpoint.names()) == sorted(expected)
    for name, tensor in expected.items():
        assert checkpoint.shape(name) == tuple(tensor.shape)
        assert checkpoint.dtype(name) == torch.float32
        assert torch.equal(checkpoint.get(name), tensor)
    assert checkpoint.config.num_hidden_layers == 2


def test_checkpoint_reports_the_stored_dtype_and_converts_on_request(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    checkpoint = open_checkpoint(saved(model, tmp_path / "bf16"))
    name = "model.layers.1.mlp.up_proj.weight"
    assert checkpoint.dtype(name) == torch.bfloat16
    assert checkpoint.get(name).dtype == torch.bfloat16
    as_float = checkpoint.get(name, device="cpu", dtype=torch.float32)
    assert as_float.dtype == torch.float32
    assert torch.equal(as_float, model.state_dict()[name].float())


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        open_checkpoint(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a checkpoint laserrmt reads lazily"):
        open_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no safetensors weights"):
        open_checkpoint(tmp_path / "empty")
    folder = saved(tiny_llama(), tmp_path / "sharded", max_shard_size="40KB")
    next(folder.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="lacks 1 weight shard") as caught:
        open_checkpoint(folder)
    assert "\n" not in str(caught.value)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        open_checkpoint(fake)


def _permute_like_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two rotary halves of every head's rows.
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(model, path):
    """A float32 GGUF of a tiny untied Llama, written the way llama.cpp's converter names and
    permutes the tensors."""
    import gguf

    config = model.config
    outer = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().copy()
        if name in outer:
            writer.add_tensor(outer[name], array)
            continue
        _, _, block, rest = name.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        part = parts[module]
        if part == "attn_q":
            array = _permute_like_llama_cpp(array, config.num_attention_heads)
        elif part == "attn_k":
            array = _permute_like_llama_cpp(array, config.num_key_value_heads)
        writer.add_tensor(f"blk.{block}.{part}.{suffix}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_tensors_read_under_transformers_names_and_unpermuted(tmp_path):
    pytest.importorskip("gguf")
    model = tiny_llama(tie_word_embeddings=False)
    checkpoint = open_checkpoint(write_tiny_llama_gguf(model, tmp_path / "tiny.gguf"))
    assert checkpoint.kind == "gguf"
    expected = model.state_dict()
    assert sorted(checkpoint.names()) == sorted(expected)
    for name, tensor in expected.items():
        assert checkpoint.shape(name) == tuple(tensor.shape)
        assert torch.equal(checkpoint.get(name), tensor), name
    assert readable_lazily(tmp_path / "tiny.gguf")


# --------------------------------------------------------------------------- analysis


def _close(a, b):
    if isinstance(a, float) or isinstance(b, float):
        a, b = float(a), float(b)
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_close, a, b))
    return a == b


@pytest.mark.parametrize(
    "build",
    [tiny_llama, tiny_gpt2, tiny_qwen2, lambda: tiny_bert(num_labels=3)],
    ids=["llama-tied", "gpt2-conv1d", "qwen2-untied", "bert-classifier"],
)
def test_streaming_analysis_equals_the_in_memory_one(tmp_path, build):
    folder = save_tiny(build(), tmp_path / "model")
    loaded = load_model(folder)
    in_memory = analyze_model(loaded.model, include_heads=True, progress=False)
    streamed, source = analyze_checkpoint(
        open_checkpoint(folder), include_heads=True, progress=False
    )
    assert source == loaded.source
    write_analysis(in_memory, tmp_path / "a", model_source=source)
    write_analysis(streamed, tmp_path / "b", model_source=source)
    a = json.loads((tmp_path / "a" / "spectra.json").read_text())
    b = json.loads((tmp_path / "b" / "spectra.json").read_text())
    assert [r["module"] for r in a] == [r["module"] for r in b]
    assert any(r["role"] == "attn.q" or r["role"] == "attn.qkv" for r in b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert _close(x[key], y[key]), (x["module"], key, x[key], y[key])


def test_a_checkpoint_without_its_head_streams_as_the_base_model(tmp_path):
    # A BertModel's weights under a config that names the classification head, the layout
    # of sentence-embedding checkpoints: load_model reads it as the base model, and so must
    # the stream.
    folder = save_tiny(tiny_bert(), tmp_path / "encoder")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder)
    stream = BlockStream(open_checkpoint(folder))
    assert type(stream.model).__name__ == type(loaded.model).__name__ == "BertModel"
    assert stream.source == loaded.source and "no weights for the head" in stream.source


def test_streaming_analysis_holds_one_matrix_at_a_time(tmp_path):
    model = tiny_llama(tie_word_embeddings=False)
    stream = BlockStream(open_checkpoint(save_tiny(model, tmp_path / "m")))
    real_counts = []
    load = stream.load

    def counting_load(names):
        load(names)
        real = [n for n, p in stream.model.named_parameters() if p.device.type != "meta"]
        real_counts.append(len(real))

    stream.load = counting_load  # type: ignore[method-assign]
    result = analyze_model(stream.model, progress=False, stream=stream)
    assert len(result.records) == 14
    assert max(real_counts) == 1  # Llama's linear layers have no bias: one weight at a time
    assert all(p.device.type == "meta" for p in stream.model.parameters())
    expected = torch.linalg.svdvals(model.model.layers[1].mlp.down_proj.weight.detach().double())
    spectrum = result.spectra["model.layers.1.mlp.down_proj"].singular_values
    np.testing.assert_allclose(spectrum, expected.numpy(), rtol=1e-10)


def test_cli_analyze_streams_a_folder_without_loading_the_model(tmp_path, monkeypatch, capsys):
    import laserrmt.models.loading as loading

    model = tiny_gpt2()
    folder = save_tiny(model, tmp_path / "m")

    def refuse(*args, **kwargs):
        raise AssertionError("the streaming path must not load the whole model")

    monkeypatch.setattr(loading, "load_model", refuse)
    assert main(["--quiet", "analyze", str(folder), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    records = json.loads((tmp_path / "out" / "spectra.json").read_text())
    by_name = {r["module"]: r for r in records}
    # GPT-2's Conv1D stores in × out: the record must show out × in, as weight_matrix does.
    c_fc = by_name["transformer.h.0.mlp.c_fc"]
    assert c_fc["shape"] == [256, 64]
    s = torch.linalg.svdvals(model.transformer.h[0].mlp.c_fc.weight.detach().double())
    assert math.isclose(c_fc["s_max"], float(s[0]), rel_tol=1e-12)


# --------------------------------------------------------------------------- BlockStream


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_a_materialised_block_equals_the_loaded_one_and_is_freed_after(tmp_path, build):
    model = build()
    stream = BlockStream(open_checkpoint(save_tiny(model, tmp_path / "m")))
    assert len(stream.blocks) == 2
    for index, prefix in enumerate(stream.blocks):
        expected = dict(model.get_submodule(prefix).named_parameters())
        with stream.block(index) as block:
            got = dict(block.named_parameters())
            assert got.keys() == expected.keys()
            for name, param in expected.items():
                assert got[name].device.type == "cpu"
                assert torch.equal(got[name], param), (prefix, name)
            others = [p for n, p in stream.model.named_parameters() if not n.startswith(prefix)]
            assert all(p.device.type == "meta" for p in others)
        assert all(p.device.type == "meta" for p in block.parameters())
    with stream.outer() as skeleton:
        embedding = skeleton.get_input_embeddings().weight
        assert torch.equal(embedding, model.get_input_embeddings().weight)
    assert all(p.device.type == "meta" for p in stream.model.parameters())


def test_blocks_materialise_in_the_requested_dtype(tmp_path):
    model = tiny_llama()
    stream = BlockStream(open_checkpoint(save_tiny(model, tmp_path / "m")), dtype=torch.bfloat16)
    with stream.block(1) as block:
        weight = block.mlp.down_proj.weight
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, model.model.layers[1].mlp.down_proj.weight.bfloat16())


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_run_blocks_equals_the_full_forward(tmp_path, build):
    model = build()
    stream = BlockStream(open_checkpoint(save_tiny(model, tmp_path / "m")))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.model(input_ids=ids).last_hidden_state
    got = stream.run_blocks(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(p.device.type == "meta" for p in stream.model.parameters())


def test_run_blocks_refuses_a_model_it_does_not_know(tmp_path):
    stream = BlockStream(open_checkpoint(save_tiny(tiny_gpt2(), tmp_path / "m")))
    with pytest.raises(ModelLoadError, match="Llama-style"):
        stream.run_blocks(torch.zeros(1, 4, dtype=torch.long))


def test_streaming_analysis_in_bfloat16_equals_the_placed_model(tmp_path):
    folder = save_tiny(tiny_llama(), tmp_path / "m")
    placed = analyze_model(load_model(folder).model, dtype="bfloat16", progress=False)
    streamed, _ = analyze_checkpoint(open_checkpoint(folder), dtype="bfloat16", progress=False)
    float32, _ = analyze_checkpoint(open_checkpoint(folder), progress=False)
    assert streamed.to_json() == placed.to_json()
    assert streamed.records[0]["s_max"] != float32.records[0]["s_max"]  # the cast took effect
