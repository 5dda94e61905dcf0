"""Sharded outputs: the Hugging Face index layout, lazy loading, device maps, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from laserrmt.errors import InvalidOptionError, ModelLoadError
from laserrmt.surgery.io import load, load_into, save_compressed
from laserrmt.surgery.lowrank import LowRankConv2d, LowRankLinear
from laserrmt.surgery.quantize import Int8Linear
from laserrmt.surgery.shards import ShardWriter, WeightFiles
from tests.test_surgery_io import _factorized, _int8, _width_cut
from tests.tiny_models import tiny_llama

IDS = torch.tensor([[3, 17, 99, 4, 50, 1, 127, 8, 8, 60]])
#: Below one MLP matrix of the tiny Llama (128 × 64 float32 = 32 KiB): many shards.
SMALL_SHARD = 40_000


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _dense(model: nn.Module) -> nn.Module:
    return model


def _stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a save must store: every state-dict entry except the tied head."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def test_shards_follow_the_transformers_layout(tmp_path):
    model = _factorized(tiny_llama())
    out = save_compressed(model, tmp_path / "out", max_shard_size=SMALL_SHARD)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(files)
    assert count >= 3
    assert files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert not (out / "model.safetensors").exists()
    assert not list(out.glob(".*"))  # no temporary shard left

    expected = _stored_tensors(model)
    assert set(index["weight_map"]) == set(expected)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in expected.values()
    )
    for name in files:
        with safe_open(out / name, framework="pt") as handle:
            keys = set(handle.keys())
            assert keys == {k for k, f in index["weight_map"].items() if f == name}
            sizes = [expected[k].numel() * expected[k].element_size() for k in keys]
            for key in keys:
                assert torch.equal(handle.get_tensor(key), expected[key])
            # Tied names are recorded for laserrmt.load, as in the single file.
            assert handle.metadata()["lm_head.weight"] == "model.embed_tokens.weight"
        # Full, or one tensor that alone is larger than a shard.
        assert sum(sizes) <= SMALL_SHARD or len(sizes) == 1


def test_default_is_one_file_without_index(tmp_path):
    out = save_compressed(tiny_llama(), tmp_path / "out")
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


CHANGES = {"dense": _dense, "factorized": _factorized, "int8": _int8, "width-cut": _width_cut}


@pytest.mark.parametrize("change", list(CHANGES))
def test_sharded_folder_loads_back_to_identical_logits(tmp_path, change):
    model = CHANGES[change](tiny_llama())
    out = save_compressed(model, tmp_path / "out", max_shard_size=SMALL_SHARD)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    loaded, _ = load(out)
    assert torch.equal(_logits(loaded), _logits(model))
    assert {n: type(m) for n, m in loaded.named_modules()} == {
        n: type(m) for n, m in model.named_modules()
    }
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert all(p.requires_grad for p in loaded.parameters())  # healing can train it


@pytest.mark.parametrize("change", [_factorized, _int8, _width_cut])
def test_plain_transformers_refuses_a_sharded_compressed_folder(tmp_path, change):
    import transformers

    out = save_compressed(change(tiny_llama()), tmp_path / "out", max_shard_size=SMALL_SHARD)
    # Only with trust_remote_code does the folder's own code load it (test_hf_remote_code).
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


@pytest.mark.parametrize("tied", [True, False])
def test_plain_transformers_loads_a_sharded_dense_folder(tmp_path, tied):
    import transformers

    from laserrmt.plan import CompressionPlan, ModuleDecision
    from laserrmt.surgery.apply import apply_plan

    model = tiny_llama(tie_word_embeddings=tied)
    denoised = [
        ModuleDecision(name, tuple(m.weight.shape), min(m.weight.shape), 4, "denoise")
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers.0." in name
    ]
    apply_plan(model, CompressionPlan.from_decisions(denoised, method="test"), progress=False)
    out = save_compressed(model, tmp_path / "out", max_shard_size=SMALL_SHARD)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(plain), _logits(model))


def test_load_casts_each_tensor_to_the_asked_dtype(tmp_path):
    model = _int8(tiny_llama())
    out = save_compressed(model, tmp_path / "out", max_shard_size=SMALL_SHARD)
    loaded, _ = load(out, dtype=torch.bfloat16)
    layer = loaded.model.layers[0].mlp.up_proj
    assert isinstance(layer, Int8Linear)
    assert layer.weight_int8.dtype == torch.int8
    assert torch.equal(layer.weight_int8, model.model.layers[0].mlp.up_proj.weight_int8)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(
        loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16)
    )


# ---------------------------------------------------------------------------------------------
# Device maps (accelerate's big-model inference)


def test_device_map_cpu_dispatches_the_whole_model(tmp_path):
    model = _factorized(tiny_llama())
    out = save_compressed(model, tmp_path / "out", max_shard_size=SMALL_SHARD)
    for device_map in ({"": "cpu"}, "cpu", "auto"):
        loaded, _ = load(out, device_map=device_map)
        assert set(loaded.hf_device_map.values()) == {"cpu"}
        assert torch.equal(_logits(loaded), _logits(model))


def test_device_map_offloads_blocks_to_disk(tmp_path):
    model = _factorized(tiny_llama())
    out = save_compressed(model, tmp_path / "out", max_shard_size=SMALL_SHARD)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offload = tmp_path / "offload"
    loaded, _ = load(out, device_map=device_map, offload_folder=offload)
    block = loaded.model.layers[1]
    assert isinstance(block.self_attn.q_proj, LowRankLinear)
    assert all(p.is_meta for p in block.parameters())
    assert not any(p.is_meta for p in loaded.model.layers[0].parameters())
    offloaded = json.loads((offload / "index.json").read_text())
    assert set(offloaded) == {k for k in model.state_dict() if k.startswith("model.layers.1.")}
    # accelerate's hooks bring the block in for its forward pass.
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize(
    ("device_map", "offload", "message"),
    [
        ({"model.layers": "cpu"}, None, "gives no device for model.embed_tokens.weight"),
        ({"": "cpu", "model.decoder": "cpu"}, None, "names model.decoder, not modules"),
        ({"": "cpu", "model.layers.1": "disk"}, None, "offload_folder"),
        ({"": "warp-drive"}, None, "not a device"),
        ({"": "cpu", "lm_head": "disk"}, "{tmp}", "lm_head.weight and model.embed_tokens.weight"),
    ],
)
def test_bad_device_maps_are_one_line_errors(tmp_path, device_map, offload, message):
    out = save_compressed(tiny_llama(), tmp_path / "out", max_shard_size=SMALL_SHARD)
    if offload is not None:
        offload = tmp_path / "offload"
    with pytest.raises(InvalidOptionError, match=message) as info:
        load(out, device_map=device_map, offload_folder=offload)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_maps_on_a_gpu(tmp_path):
    model = _factorized(tiny_llama())
    out = save_compressed(model, tmp_path / "out", max_shard_size=SMALL_SHARD)
    expected = _logits(model)
    split = {"": "cpu", "model.layers.1": 0}
    for device_map in ({"": "cuda:0"}, "auto", split):
        loaded, _ = load(out, device_map=device_map)
        if device_map is split:
            assert loaded.model.layers[1].self_attn.q_proj.A.device.type == "cuda"
            assert loaded.model.layers[0].self_attn.q_proj.A.device.type == "cpu"
        with torch.no_grad():
            logits = loaded(input_ids=IDS.to(loaded.device)).logits.cpu()
        assert (logits - expected).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------
# Damaged folders, models without a transformers config, options


def test_missing_shard_is_a_model_load_error(tmp_path):
    out = save_compressed(tiny_llama(), tmp_path / "out", max_shard_size=SMALL_SHARD)
    count = len(list(out.glob("model-*.safetensors")))
    (out / f"model-00002-of-{count:05d}.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"lacks the shards model-00002-of-\d+\.safetensors"):
        load(out)


def test_index_that_disagrees_with_a_shard_is_a_model_load_error(tmp_path):
    out = save_compressed(tiny_llama(), tmp_path / "out", max_shard_size=SMALL_SHARD)
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    moved = next(k for k, f in index["weight_map"].items() if f == first)
    index["weight_map"][moved] = second
    index_file.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="holds other tensors than"):
        load(out)


def test_unreadable_index_is_a_model_load_error(tmp_path):
    out = save_compressed(tiny_llama(), tmp_path / "out", max_shard_size=SMALL_SHARD)
    (out / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ModelLoadError, match="is not a safetensors index"):
        load(out)


def test_an_alias_recorded_after_its_tensor_was_written_is_read_back(tmp_path):
    # The streaming order: the embedding goes first, the tied head is known only at the end.
    writer = ShardWriter(tmp_path, max_shard_size=100)
    embedding = torch.arange(40, dtype=torch.float32)
    writer.add("embed.weight", embedding)
    for i in range(3):
        writer.add(f"block{i}.weight", torch.full((10,), float(i)))
    writer.alias("head.weight", "embed.weight")
    files = writer.close()
    # 160 bytes alone (over the limit), then 40 + 40, then the last 40 that would overflow.
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with safe_open(files[0], framework="pt") as handle:
        assert "head.weight" not in handle.metadata()  # written before the alias was known
    read = WeightFiles(tmp_path)
    assert read.aliases == {"head.weight": "embed.weight"}
    tensors = dict(read.tensors())
    assert torch.equal(tensors["embed.weight"], embedding)
    assert torch.equal(tensors["block2.weight"], torch.full((10,), 2.0))


def test_load_into_reads_shards(tmp_path):
    torch.manual_seed(0)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)
        )

    model = build()
    model[0] = LowRankConv2d.from_conv(model[0], 3)
    x = torch.randn(2, 3, 6, 6)
    out = save_compressed(model, tmp_path / "cnn", max_shard_size=1000)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    fresh = load_into(build(), out)
    assert isinstance(fresh[0], LowRankConv2d)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("size", [0, -5, 1.5, "2GB"])
def test_max_shard_size_must_be_positive_bytes(tmp_path, size):
    with pytest.raises(InvalidOptionError, match="max_shard_size"):
        save_compressed(tiny_llama(), tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Memory: loading never builds a second copy of the weights

_MEASURE = textwrap.dedent(
    """
    import json, sys
    import laserrmt.surgery.io

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    # A first load imports and initialises everything a load needs, outside the measurement.
    laserrmt.surgery.io.load(sys.argv[1])
    before = status("VmRSS:")
    model, _ = laserrmt.surgery.io.load(sys.argv[2])
    # Touch every weight: tensors read from a file may stay mapped until first used.
    total = sum(float(t.float().sum()) for t in model.state_dict().values())
    peak = status("VmHWM:")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"growth": peak - before, "weights": weights, "total": total}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_loading_shards_holds_one_copy_of_the_weights(tmp_path):
    # About 64 MB of float32 weights: large enough that the interpreter's noise is small.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=264,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    out = save_compressed(model, tmp_path / "out", max_shard_size=8 * 2**20)
    del model
    warm_up = save_compressed(tiny_llama(), tmp_path / "tiny", max_shard_size=SMALL_SHARD)
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    done = subprocess.run(
        [sys.executable, str(script), str(warm_up), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["weights"] > 60e6
    # Loading a full state dict into a built model needs two copies (laserrmt 0.1.0: 1.9×); one
    # copy, one tensor in flight and the interpreter's allocations stay far below that.
    assert measured["growth"] < 1.4 * measured["weights"], measured
