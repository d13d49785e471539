"""AdapterLibrary: PEFT round trip against real peft/transformers files, validation, orbax."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from d2c_jax.library import (
    AdapterError,
    AdapterLibrary,
    LibraryWarning,
    lora_scale,
    save_peft_adapter,
)

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
    assert (back.key_prefix, back.stored_entries) == (lib.key_prefix, lib.stored_entries)


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
        (dict(fan_in_fan_out=True), "fan_in_fan_out"),
        (dict(peft_type="IA3"), "peft_type"),
        (dict(target_modules="(q_proj"), "target_modules '\\(q_proj' is not a regex"),
        (dict(target_modules=[]), "target_modules must be"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern must map names to positive integers"),
        (dict(alpha_pattern={"[": 2}), "alpha_pattern '\\[' is not a regex"),
        (dict(layers_to_transform=["0"]), "layers_to_transform must be"),
        (dict(layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
        (dict(target_modules=".*_proj", layers_to_transform=[0]), "cannot be used with"),
        (dict(r=0), "r must be"),
    ],
)
def test_unsupported_config_is_rejected_naming_the_file(tmp_path, change, message):
    make_peft_adapter(tmp_path / "x", seed=0)
    _edit_config(tmp_path / "x", **change)
    with pytest.raises(AdapterError, match=message) as err:
        AdapterLibrary.load([tmp_path / "x"])
    assert str(tmp_path / "x") in str(err.value)


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
    with pytest.raises(AdapterError, match="adapter_model.safetensors.*q_proj.*one r"):
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
    with pytest.raises(AdapterError, match="x/adapter_model.safetensors.*no lora_B.*every layer"):
        AdapterLibrary.load([tmp_path / "x"])
    _edit_weights(
        tmp_path / "x",
        lambda t: t.pop("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"),
    )
    with pytest.raises(AdapterError, match="no lora_A/lora_B for model.layers.0.self_attn.v_proj"):
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


# ------------------------------------------------- every LoRA layout PEFT writes
# The reference is PEFT itself: each adapter is made with get_peft_model, saved, loaded
# back with PeftModel.from_pretrained, and its `get_delta_weight` per LoraLayer is
# compared with our scale * B @ A; every (module, layer) PEFT does not adapt must be
# exactly zero in the library.

TINY64 = dict(TINY, vocab_size=259, hidden_size=64, intermediate_size=128)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny64_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY64))


def save_peft(path, model, seed=0, **lora):
    """get_peft_model(model, LoraConfig(**lora)) with random A and B, saved to `path`."""
    lora = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **lora}
    torch.manual_seed(seed)
    get_peft_model(model, LoraConfig(**lora)).save_pretrained(str(path))
    return path


def peft_deltas(peft_model) -> dict[tuple[str, int], np.ndarray]:
    """{(module, layer): PEFT's own dense delta} of every LoRA layer of the model."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            match = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", name)
            delta = layer.get_delta_weight("default").detach().double().numpy()
            deltas[(match[2], int(match[1]))] = delta
    return deltas


def assert_deltas_match(lib, name, reference):
    """Our delta of adapter `name` equals PEFT's for every (module, layer) it adapts
    and is exactly zero (zero A and zero B) for every other one."""
    i = lib.index(name)
    assert {m for m, _ in reference} <= set(lib.target_modules)
    for module in lib.target_modules:
        a = np.asarray(lib.params[module]["A"][i], np.float64)
        b = np.asarray(lib.params[module]["B"][i], np.float64)
        for layer in range(lib.num_layers):
            if (module, layer) in reference:
                ours = float(lib.scale[i]) * b[layer] @ a[layer]
                np.testing.assert_allclose(ours, reference[(module, layer)], rtol=1e-6, atol=1e-6)
            else:
                assert not a[layer].any() and not b[layer].any(), (name, module, layer)


def reference_deltas(path, model):
    return peft_deltas(PeftModel.from_pretrained(model, str(path)))


def test_regex_target_modules_and_a_union_of_module_sets(tmp_path):
    regex = r"model\.layers\.(0\.self_attn\.(q_proj|k_proj)|1\.mlp\.down_proj)"
    save_peft(tmp_path / "lib" / "regex", tiny64_model(), seed=1, target_modules=regex)
    save_peft(tmp_path / "lib" / "qv", tiny64_model(), seed=2, target_modules=["q_proj", "v_proj"])
    save_peft(tmp_path / "lib" / "all", tiny64_model(), seed=3, target_modules="all-linear")
    lib = AdapterLibrary.load(tmp_path / "lib")
    assert lib.target_modules == tuple(sorted(ALL))
    assert lib.params["down_proj"]["A"].shape == (3, 2, 4, 128)
    for name in lib.names:
        reference = reference_deltas(tmp_path / "lib" / name, tiny64_model())
        assert_deltas_match(lib, name, reference)
    assert set(reference_deltas(tmp_path / "lib" / "regex", tiny64_model())) == {
        ("q_proj", 0),
        ("k_proj", 0),
        ("down_proj", 1),
    }


def file_bytes(path, itemsize):
    return itemsize * sum(t.numel() for t in torch_load_file(str(path)).values())


def test_storage_bytes_count_what_each_adapter_stores(tmp_path):
    root = tmp_path / "lib"
    save_peft(root / "qv", tiny64_model(), target_modules=["q_proj", "v_proj"], r=2)
    save_peft(root / "all", tiny64_model(), target_modules=list(ALL), layers_to_transform=[1])
    lib = AdapterLibrary.load(root)
    files = [root / name / "adapter_model.safetensors" for name in lib.names]
    assert lib.storage_bytes(jnp.float32) == sum(file_bytes(f, 4) for f in files)
    assert lib.storage_bytes() == sum(file_bytes(f, 2) for f in files)  # bfloat16
    # a merged adapter: rank 4 over the union of modules, every layer
    shapes = lib.module_shapes()
    assert lib.adapter_bytes(jnp.float32) == 4 * 2 * 4 * sum(o + i for o, i in shapes.values())
    assert lib.subset([1]).storage_bytes(jnp.float32) == file_bytes(files[1], 4)


def test_regex_refuses_tensors_it_could_not_have_targeted(tmp_path):
    save_peft(tmp_path / "x", tiny64_model(), target_modules=["q_proj", "v_proj"])
    _edit_config(tmp_path / "x", target_modules=r".*\.q_proj")
    with pytest.raises(
        AdapterError,
        match=r"x/adapter_model.safetensors: has LoRA tensors for "
        r"model.layers.0.self_attn.v_proj, which adapter_config.json could not",
    ):
        AdapterLibrary.load([tmp_path / "x"])
    _edit_config(tmp_path / "x", target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    with pytest.raises(AdapterError, match="v_proj, which .* could not .*exclude_modules"):
        AdapterLibrary.load([tmp_path / "x"])


@pytest.mark.parametrize(
    "layers",
    [dict(layers_to_transform=[1]), dict(layers_to_transform=0, layers_pattern="layers")],
)
def test_layers_to_transform_leaves_exact_zeros(tmp_path, layers):
    save_peft(
        tmp_path / "lib" / "some", tiny64_model(), target_modules=["q_proj", "o_proj"], **layers
    )
    save_peft(tmp_path / "lib" / "every", tiny64_model(), seed=1, target_modules=["q_proj"])
    lib = AdapterLibrary.load(tmp_path / "lib")
    assert lib.num_layers == 2 and lib.target_modules == ("o_proj", "q_proj")
    for name in lib.names:
        assert_deltas_match(lib, name, reference_deltas(tmp_path / "lib" / name, tiny64_model()))


def test_num_layers_pads_a_library_that_skips_the_last_layers(tmp_path):
    save_peft(tmp_path / "x", tiny64_model(), target_modules=["v_proj"], layers_to_transform=[0])
    assert AdapterLibrary.load([tmp_path / "x"]).num_layers == 1
    lib = AdapterLibrary.load([tmp_path / "x"], num_layers=2)
    assert lib.num_layers == 2
    assert_deltas_match(lib, "x", reference_deltas(tmp_path / "x", tiny64_model()))
    save_peft(tmp_path / "y", tiny64_model(), target_modules=["v_proj"])
    with pytest.raises(AdapterError, match="y/adapter_model.safetensors: has layer 1, but the"):
        AdapterLibrary.load([tmp_path / "y"], num_layers=1)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_fold_into_b_exactly(tmp_path, use_rslora):
    patterns = {
        # the first matching key wins (PEFT's get_pattern_key): layer 1's q_proj is 6
        "first": dict(
            rank_pattern={r"layers\.1\.self_attn\.q_proj": 6, "q_proj": 2, "v_proj": 3},
            alpha_pattern={"model.layers.0.self_attn.v_proj": 5, "q_proj": 3},
        ),
        "second": dict(rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 1.5}),
    }
    for seed, (name, pattern) in enumerate(patterns.items()):
        save_peft(
            tmp_path / "lib" / name,
            tiny64_model(),
            seed=seed,
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_rslora=use_rslora,
            **pattern,
        )
    lib = AdapterLibrary.load(tmp_path / "lib")
    assert lib.rank == 6 and lib.ranks == (6, 4)
    assert float(lib.scale[0]) == pytest.approx(lora_scale(8, 4, use_rslora))
    for name in lib.names:
        assert_deltas_match(lib, name, reference_deltas(tmp_path / "lib" / name, tiny64_model()))


def test_a_rank_that_contradicts_rank_pattern_is_refused(tmp_path):
    """PEFT 0.21 writes adapter_config.json with sorted keys, so overlapping patterns
    given out of order save an adapter PEFT itself cannot load: refused as PEFT does."""
    overlapping = {"q_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}
    save_peft(tmp_path / "y", tiny64_model(), target_modules=["q_proj"], rank_pattern=overlapping)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(tiny64_model(), str(tmp_path / "y"))
    with pytest.raises(AdapterError, match=r"y/.*layers.1.self_attn.q_proj has rank 2, .* r=6"):
        AdapterLibrary.load([tmp_path / "y"])
    save_peft(tmp_path / "x", tiny64_model(), target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    _edit_config(tmp_path / "x", rank_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    with pytest.raises(AdapterError, match="model.layers.0.self_attn.q_proj has rank 2, but .*r=4"):
        AdapterLibrary.load([tmp_path / "x"])


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
        dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=1),
        dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.0\..*"),
        dict(target_modules=r".*layers\.[01]\.mlp\.(up|gate)_proj"),
        dict(
            target_modules=["k_proj"], layers_to_transform=[0], layers_pattern=["blocks", "layers"]
        ),
        dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"),
    ],
)
def test_target_and_pattern_rules_are_peft_s(tmp_path, lora):
    """Our reading of a saved config is PEFT's: `check_target_module_exists` for the
    modules, `get_pattern_key` (first key in file order) for ranks and alphas."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    from d2c_jax.library import _read_config

    patterns = dict(
        rank_pattern={"v_proj": 2, r"layers\.1\..*": 3, "q_proj": 5},
        alpha_pattern={r"model\.layers\.0\.mlp\..*": 3.5, "_proj": 7},
    )
    LoraConfig(r=4, lora_alpha=8, **lora, **patterns).save_pretrained(str(tmp_path))
    config = LoraConfig.from_pretrained(str(tmp_path))  # what PEFT loads: the file's order
    spec = _read_config(tmp_path)
    names = [n for n, m in tiny64_model().named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(names) == 15
    for name in names:
        assert spec.targets(name) == bool(check_target_module_exists(config, name)), name
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern, name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, name), 8)
        assert spec.module_scale(name) == (rank, alpha / rank), name


def test_language_model_prefix_reads_and_writes_back_for_that_model(tmp_path):
    """Gemma 3 and other multimodal models keep the decoder at model.language_model:
    PEFT's own keys for such a model are read, and written back PEFT loads them."""

    class LanguageTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.language_model = LlamaModel(LlamaConfig(**TINY64))

    class Multimodal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = LanguageTower()

        def prepare_inputs_for_generation(self, *args, **kwargs):  # PEFT's CAUSAL_LM needs it
            raise NotImplementedError

    save_peft(tmp_path / "mm", Multimodal(), target_modules=["q_proj", "gate_proj"])
    assert next(
        iter(torch_load_file(str(tmp_path / "mm" / "adapter_model.safetensors")))
    ).startswith("base_model.model.model.language_model.layers.")
    lib = AdapterLibrary.load([tmp_path / "mm"])
    assert lib.key_prefix == "base_model.model.model.language_model."
    reference = reference_deltas(tmp_path / "mm", Multimodal())
    assert_deltas_match(lib, "mm", reference)
    params, scale = lib.adapter(0)
    out = save_peft_adapter(
        tmp_path / "out",
        params,
        rank=lib.rank,
        alpha=scale * lib.rank,
        base_model=None,
        dtype=jnp.float32,
        key_prefix=lib.key_prefix,
    )
    assert peft_deltas(PeftModel.from_pretrained(Multimodal(), str(out))).keys() == reference.keys()
    assert_deltas_match(AdapterLibrary.load([out]), "out", reference)


def _rename_keys(path, old, new):
    _edit_weights(path, lambda t: t.update({k.replace(old, new): t.pop(k) for k in list(t)}))


def test_renamed_language_model_keys_and_mixed_prefixes(tmp_path):
    save_peft(tmp_path / "lib" / "a", tiny64_model(), target_modules=["q_proj"])
    save_peft(tmp_path / "lib" / "b", tiny64_model(), seed=1, target_modules=["q_proj"])
    reference = reference_deltas(tmp_path / "lib" / "a", tiny64_model())
    _rename_keys(tmp_path / "lib" / "a", "model.model.model.", "model.model.model.language_model.")
    lib = AdapterLibrary.load([tmp_path / "lib" / "a"])
    assert lib.key_prefix == "base_model.model.model.language_model."
    assert_deltas_match(lib, "a", reference)
    with pytest.raises(
        AdapterError,
        match=r"lib/b/adapter_model.safetensors: keys start with "
        r"'base_model.model.model.' but .*lib/a/adapter_model.safetensors has",
    ):
        AdapterLibrary.load(tmp_path / "lib")


def test_phi3_fused_modules_read_and_write_back(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    def phi3():
        torch.manual_seed(0)
        return Phi3ForCausalLM(Phi3Config(**TINY64, pad_token_id=0, bos_token_id=1, eos_token_id=2))

    save_peft(tmp_path / "phi", phi3(), target_modules=["qkv_proj", "gate_up_proj", "o_proj"])
    lib = AdapterLibrary.load([tmp_path / "phi"])
    assert lib.target_modules == ("gate_up_proj", "o_proj", "qkv_proj")
    assert lib.module_shapes()["gate_up_proj"] == (256, 64)
    reference = reference_deltas(tmp_path / "phi", phi3())
    assert_deltas_match(lib, "phi", reference)
    params, scale = lib.adapter(0)
    out = save_peft_adapter(
        tmp_path / "out", params, rank=4, alpha=scale * 4, base_model=None, dtype=jnp.float32
    )
    assert_deltas_match(lib, "phi", reference_deltas(out, phi3()))


def test_a_module_under_the_wrong_submodule_is_refused(tmp_path):
    save_peft(tmp_path / "x", tiny64_model(), target_modules=["q_proj"])
    _rename_keys(tmp_path / "x", "self_attn.q_proj", "mlp.q_proj")
    with pytest.raises(
        AdapterError,
        match=r"x/adapter_model.safetensors: tensor .* puts 'q_proj' "
        r"under 'mlp'; PEFT keys .* under 'self_attn'",
    ):
        AdapterLibrary.load([tmp_path / "x"])


def test_a_lora_outside_the_decoder_layers_is_refused(tmp_path):
    save_peft(tmp_path / "x", tiny64_model(), target_modules=["q_proj", "lm_head"])
    with pytest.raises(
        AdapterError,
        match=r"x/adapter_model.safetensors: tensor "
        r"'base_model.model.lm_head.* is not a LoRA factor of a decoder",
    ):
        AdapterLibrary.load([tmp_path / "x"])


# ------------------------------------------------------- base model names, directories


@pytest.mark.parametrize(
    "names",
    [
        (None, "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "/models/SmolLM2-135M-Instruct/"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct", None),
    ],
)
def test_base_model_spellings_are_one_model(tmp_path, names):
    for i, name in enumerate(names):
        make_peft_adapter(tmp_path / "lib" / f"t{i}", seed=i)
        _edit_config(tmp_path / "lib" / f"t{i}", base_model_name_or_path=name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = AdapterLibrary.load(tmp_path / "lib")
    assert lib.base_model == next(n for n in names if n)


def test_different_base_model_names_only_warn(tmp_path):
    make_peft_adapter(tmp_path / "lib" / "a", seed=0)
    make_peft_adapter(tmp_path / "lib" / "b", seed=1)
    _edit_config(tmp_path / "lib" / "a", base_model_name_or_path="org/tiny")
    _edit_config(tmp_path / "lib" / "b", base_model_name_or_path="other/model")
    with pytest.warns(
        LibraryWarning, match=r"lib/b/adapter_config.json: 'other/model'.*'org/tiny'"
    ):
        lib = AdapterLibrary.load(tmp_path / "lib")
    assert lib.base_model == "org/tiny" and lib.num_adapters == 2


def test_a_bad_entry_of_a_library_directory_is_named_never_skipped(tmp_path):
    make_peft_adapter(tmp_path / "lib" / "a", seed=0)
    (tmp_path / "lib" / "manifest.json").write_text("{}")  # plain files are not adapters
    (tmp_path / "lib" / ".tmp-write").mkdir()  # nor our hidden temporary directories
    assert AdapterLibrary.load(tmp_path / "lib").names == ("a",)
    (tmp_path / "lib" / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"lib/gone: dangling symlink \(to .*nowhere\)"):
        AdapterLibrary.load(tmp_path / "lib")
    (tmp_path / "lib" / "gone").unlink()
    (tmp_path / "lib" / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lib/notes: not a PEFT adapter directory"):
        AdapterLibrary.load(tmp_path / "lib")
    (tmp_path / "lib" / "notes").rmdir()
    make_peft_adapter(tmp_path / "other" / "a", seed=1)
    with pytest.raises(AdapterError, match=r"two adapters named 'a': .*lib/a and .*other/a"):
        AdapterLibrary.load([tmp_path / "lib" / "a", tmp_path / "other" / "a"])


def test_an_unreadable_adapter_directory_is_named(tmp_path, monkeypatch):
    make_peft_adapter(tmp_path / "lib" / "a", seed=0)
    make_peft_adapter(tmp_path / "lib" / "b", seed=1)
    locked = tmp_path / "lib" / "b"
    if os.geteuid() == 0:  # root reads any directory: deny it the way the kernel would
        listdir = os.listdir

        def denied(path):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return listdir(path)

        monkeypatch.setattr(os, "listdir", denied)
    else:
        locked.chmod(0)
    try:
        with pytest.raises(AdapterError, match=r"lib/b: cannot read the adapter directory"):
            AdapterLibrary.load(tmp_path / "lib")
    finally:
        locked.chmod(0o755)
