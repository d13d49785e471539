"""AdapterLibrary: PEFT round trip against real peft/transformers files, validation, orbax."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file
from transformers import LlamaConfig, LlamaForCausalLM

from d2c_jax.library import AdapterError, AdapterLibrary, lora_scale, save_peft_adapter

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def tiny_torch_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def make_peft_adapter(path, seed, r=4, alpha=8, targets=("q_proj", "v_proj"), **kwargs):
    """Write a real PEFT adapter with random (non-zero) A and B via peft itself."""
    model = tiny_torch_model()
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **kwargs
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(path))
    return peft_model


def peft_factors(peft_model, module: str, layer: int, adapter: str = "default"):
    attn = peft_model.base_model.model.model.layers[layer].self_attn
    lora = getattr(attn, module)
    return (
        lora.lora_A[adapter].weight.detach().float().numpy(),
        lora.lora_B[adapter].weight.detach().float().numpy(),
        lora.scaling[adapter],
    )


@pytest.fixture
def library_dir(tmp_path):
    root = tmp_path / "lib"
    models = {
        name: make_peft_adapter(root / name, seed) for seed, name in enumerate(["b", "a", "c"])
    }
    return root, models


def test_load_matches_peft_weights_and_scaling(library_dir):
    root, models = library_dir
    lib = AdapterLibrary.load(root)
    assert lib.names == ("a", "b", "c")  # sorted directory names
    assert lib.target_modules == ("q_proj", "v_proj")
    assert lib.params["q_proj"]["A"].shape == (3, 2, 4, 32)
    assert lib.params["v_proj"]["B"].shape == (3, 2, 16, 4)
    for i, name in enumerate(lib.names):
        for module in lib.target_modules:
            for layer in range(2):
                a, b, scaling = peft_factors(models[name], module, layer)
                np.testing.assert_array_equal(lib.params[module]["A"][i, layer], a)
                np.testing.assert_array_equal(lib.params[module]["B"][i, layer], b)
                assert float(lib.scale[i]) == pytest.approx(scaling)


def test_rslora_scale_matches_peft(tmp_path):
    model = make_peft_adapter(tmp_path / "rs", seed=0, r=4, alpha=8, use_rslora=True)
    lib = AdapterLibrary.load([tmp_path / "rs"])
    _, _, scaling = peft_factors(model, "q_proj", 0)
    assert float(lib.scale[0]) == pytest.approx(scaling) == pytest.approx(8 / math.sqrt(4))


def test_different_ranks_are_zero_padded_and_deltas_exact(tmp_path):
    small = make_peft_adapter(tmp_path / "lib" / "small", seed=1, r=2, alpha=4)
    make_peft_adapter(tmp_path / "lib" / "wide", seed=2, r=6, alpha=12)
    lib = AdapterLibrary.load(tmp_path / "lib")
    assert lib.rank == 6 and lib.ranks == (2, 6)
    a, b, scaling = peft_factors(small, "q_proj", 1)
    i = lib.index("small")
    delta = lib.scale[i] * lib.params["q_proj"]["B"][i, 1] @ lib.params["q_proj"]["A"][i, 1]
    np.testing.assert_allclose(delta, scaling * b @ a, rtol=1e-6, atol=1e-7)


def test_save_peft_adapter_loads_in_peft_with_same_delta(library_dir, tmp_path):
    root, _ = library_dir
    lib = AdapterLibrary.load(root)
    params, scale = lib.adapter(1)
    out = save_peft_adapter(
        tmp_path / "out",
        params,
        rank=lib.rank,
        alpha=scale * lib.rank,
        base_model=lib.base_model,
        dtype=jnp.float32,
    )
    loaded = PeftModel.from_pretrained(tiny_torch_model(), str(out))
    for module in lib.target_modules:
        for layer in range(2):
            a, b, scaling = peft_factors(loaded, module, layer)
            ours = scale * params[module]["B"][layer] @ params[module]["A"][layer]
            np.testing.assert_allclose(scaling * b @ a, ours, rtol=1e-5, atol=1e-7)
    # and our own loader reads it back
    again = AdapterLibrary.load([out])
    np.testing.assert_array_equal(again.params["v_proj"]["A"][0], params["v_proj"]["A"])


def test_save_is_atomic_and_refuses_overwrite(library_dir, tmp_path):
    root, _ = library_dir
    lib = AdapterLibrary.load(root)
    params, _ = lib.adapter(0)
    out = tmp_path / "out"
    save_peft_adapter(out, params, rank=4, alpha=4, base_model=None)
    with pytest.raises(FileExistsError, match="out"):
        save_peft_adapter(out, params, rank=4, alpha=4, base_model=None)
    bad = {"q_proj": {"A": params["q_proj"]["A"] * jnp.nan, "B": params["q_proj"]["B"]}}
    with pytest.raises(AdapterError, match="NaN"):
        save_peft_adapter(tmp_path / "bad", bad, rank=4, alpha=4, base_model=None)
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_orbax_round_trip(library_dir, tmp_path):
    root, _ = library_dir
    lib = AdapterLibrary.load(root)
    lib.save(tmp_path / "ckpt")
    back = AdapterLibrary.restore(tmp_path / "ckpt")
    assert back.names == lib.names and back.rank == lib.rank
    for module in lib.target_modules:
        for factor in "AB":
            np.testing.assert_array_equal(back.params[module][factor], lib.params[module][factor])
    np.testing.assert_array_equal(back.scale, lib.scale)


def test_storage_bytes(library_dir):
    lib = AdapterLibrary.load(library_dir[0])
    per_layer = (4 * 32 + 32 * 4) + (4 * 32 + 16 * 4)
    assert lib.adapter_bytes(jnp.bfloat16) == 2 * per_layer * 2
    assert lib.storage_bytes(jnp.float32) == 3 * 2 * per_layer * 4


# ---------------------------------------------------------------- bad input


def _edit_config(path, **changes):
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def _edit_weights(path, fn):
    weights_path = path / "adapter_model.safetensors"
    tensors = torch_load_file(str(weights_path))
    fn(tensors)
    torch_save_file(tensors, str(weights_path))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(use_dora=True), "use_dora"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(bias="all"), "bias"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out"),
        (dict(peft_type="IA3"), "peft_type"),
        (dict(target_modules=".*proj"), "regex"),
        (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
        (dict(r=0), "r must be"),
    ],
)
def test_unsupported_config_is_rejected_naming_the_file(tmp_path, change, message):
    make_peft_adapter(tmp_path / "x", seed=0)
    _edit_config(tmp_path / "x", **change)
    with pytest.raises(AdapterError, match=message) as err:
        AdapterLibrary.load([tmp_path / "x"])
    assert str(tmp_path / "x") in str(err.value)


def test_mixed_base_models_rejected(tmp_path):
    make_peft_adapter(tmp_path / "lib" / "a", seed=0)
    make_peft_adapter(tmp_path / "lib" / "b", seed=1)
    _edit_config(tmp_path / "lib" / "b", base_model_name_or_path="other/model")
    with pytest.raises(AdapterError, match=r"lib/b/adapter_config.json.*other/model"):
        AdapterLibrary.load(tmp_path / "lib")


def test_mixed_target_modules_rejected(tmp_path):
    make_peft_adapter(tmp_path / "lib" / "a", seed=0)
    make_peft_adapter(tmp_path / "lib" / "b", seed=1, targets=("q_proj", "k_proj"))
    with pytest.raises(AdapterError, match=r"lib/b.*target_modules"):
        AdapterLibrary.load(tmp_path / "lib")


def test_nan_weights_rejected(tmp_path):
    make_peft_adapter(tmp_path / "x", seed=0)

    def poison(tensors):
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = float("inf")

    _edit_weights(tmp_path / "x", poison)
    with pytest.raises(AdapterError, match="adapter_model.safetensors.*NaN or Inf"):
        AdapterLibrary.load([tmp_path / "x"])


def test_wrong_shape_rejected(tmp_path):
    make_peft_adapter(tmp_path / "x", seed=0)

    def reshape(tensors):
        key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
        tensors[key] = torch.zeros(3, 32)

    _edit_weights(tmp_path / "x", reshape)
    with pytest.raises(AdapterError, match="adapter_model.safetensors.*q_proj"):
        AdapterLibrary.load([tmp_path / "x"])


def test_mismatched_dimensions_across_adapters_rejected(tmp_path):
    make_peft_adapter(tmp_path / "lib" / "a", seed=0)
    make_peft_adapter(tmp_path / "lib" / "b", seed=1)

    def widen(tensors):
        for key in list(tensors):
            if "v_proj.lora_B" in key:
                tensors[key] = torch.zeros(24, 4)

    _edit_weights(tmp_path / "lib" / "b", widen)
    with pytest.raises(AdapterError, match=r"lib/b/adapter_model.safetensors.*d_out=24"):
        AdapterLibrary.load(tmp_path / "lib")


def test_missing_layer_rejected(tmp_path):
    make_peft_adapter(tmp_path / "x", seed=0)
    _edit_weights(
        tmp_path / "x",
        lambda t: t.pop("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"),
    )
    with pytest.raises(AdapterError, match="every layer"):
        AdapterLibrary.load([tmp_path / "x"])


def test_missing_and_corrupted_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        AdapterLibrary.load(tmp_path / "nowhere")
    make_peft_adapter(tmp_path / "x", seed=0)
    (tmp_path / "x" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="x/adapter_model.safetensors.*cannot read"):
        AdapterLibrary.load([tmp_path / "x"])
    (tmp_path / "x" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        AdapterLibrary.load([tmp_path / "x"])
    (tmp_path / "x" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="x/adapter_config.json.*JSON"):
        AdapterLibrary.load([tmp_path / "x"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter directories"):
        AdapterLibrary.load(tmp_path / "empty")


def test_lora_scale():
    assert lora_scale(16, 8, use_rslora=False) == 2.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0


@pytest.mark.slow
def test_shipped_library_covers_the_suite_and_loads_in_peft(real_base):
    """The embedded library: one bfloat16 adapter per task of the built-in suite,
    within 40 MB, and every adapter loads in PEFT with the factors and scaling that
    `AdapterLibrary` reads."""
    from d2c_jax import tasks as task_suite
    from d2c_jax.library import embedded_library_dir

    root = embedded_library_dir()
    lib = AdapterLibrary.load(root)
    assert lib.names == tuple(sorted(task_suite.list_tasks()))
    files = [root / name / "adapter_model.safetensors" for name in lib.names]
    assert sum(f.stat().st_size for f in files) <= 40 * 10**6
    assert {t.dtype for f in files for t in torch_load_file(str(f)).values()} == {torch.bfloat16}
    torch.manual_seed(0)
    from d2c_jax.models.families import to_hf

    model = LlamaForCausalLM(LlamaConfig(**to_hf(real_base.config)))
    peft_model = PeftModel.from_pretrained(model, str(root / lib.names[0]), adapter_name="a0")
    for i, name in enumerate(lib.names[1:], start=1):
        peft_model.load_adapter(str(root / name), adapter_name=f"a{i}")
    layers = real_base.config.num_layers
    for i in range(lib.num_adapters):
        for module in lib.target_modules:
            for layer in (0, layers // 2, layers - 1):
                a, b, scaling = peft_factors(peft_model, module, layer, adapter=f"a{i}")
                np.testing.assert_array_equal(np.asarray(lib.params[module]["A"][i, layer]), a)
                np.testing.assert_array_equal(np.asarray(lib.params[module]["B"][i, layer]), b)
                assert float(lib.scale[i]) == pytest.approx(scaling)
