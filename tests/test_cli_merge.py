"""`d2c merge`: output loads in PEFT with the engine's dense delta; atomic, careful writes."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from d2c_jax.cli import main
from d2c_jax.library import AdapterLibrary
from d2c_jax.merging import merge
from kernels.merge import MergeConfig

TINY = dict(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TARGETS = ("q_proj", "v_proj")


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A library directory of three random PEFT adapters with different alphas."""
    root = tmp_path_factory.mktemp("lib")
    for i, (name, alpha) in enumerate([("de", 8), ("fr", 4), ("it", 16)]):
        config = LoraConfig(
            r=4, lora_alpha=alpha, target_modules=list(TARGETS), init_lora_weights=False
        )
        torch.manual_seed(10 + i)
        get_peft_model(tiny_model(), config).save_pretrained(str(root / name))
    return root


def peft_deltas(adapter_dir) -> dict[str, np.ndarray]:
    """{module: [L, d_out, d_in]} as PEFT computes them for the saved adapter."""
    model = PeftModel.from_pretrained(tiny_model(), str(adapter_dir))
    layers = model.base_model.model.model.layers
    return {
        m: np.stack(
            [
                getattr(layer.self_attn, m).get_delta_weight("default").detach().numpy()
                for layer in layers
            ]
        )
        for m in TARGETS
    }


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "ties", "--space", "factor", "--density", "0.5"],
        ["--method", "ties", "--space", "delta", "--density", "0.5", "--trim", "global"],
        [
            "--method",
            "dare_linear",
            "--space",
            "delta",
            "--density",
            "0.7",
            "--weights",
            "1",
            "2",
            "1",
        ],
    ],
    ids=["ties-factor", "ties-delta-global", "dare-linear-delta"],
)
def test_merged_adapter_loads_in_peft_with_the_engine_delta(library, tmp_path, flags):
    out = tmp_path / "merged"
    assert main(["merge", "--adapters", str(library), "--out", str(out), *flags]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 4  # scale 1
    assert "d2c_jax" not in saved  # provenance sits beside the PEFT files
    provenance = json.loads((out / "d2c_jax.json").read_text())
    assert provenance["sources"] == ["de", "fr", "it"]
    assert provenance["merge"]["space"] == flags[3]

    lib = AdapterLibrary.load(library)
    args = dict(zip(flags[::2], flags[1::2], strict=False))
    config = MergeConfig(
        args["--method"],
        space=args["--space"],
        density=float(args["--density"]),
        trim=args.get("--trim", "per-tensor"),
        weights=(1.0, 2.0, 1.0) if "--weights" in args else None,
    )
    engine = merge(lib.params, lib.scale, jnp.ones((1, 3)), config, names=lib.names)
    loaded = peft_deltas(out)
    for m in TARGETS:
        deployed = engine.params[m]["B"][0] @ engine.params[m]["A"][0]
        np.testing.assert_allclose(loaded[m], deployed, rtol=1e-5, atol=1e-6)


def test_randomized_truncation_writes_a_near_best_rank_r_adapter(library, tmp_path):
    """--truncation randomized: PEFT loads a rank-r adapter whose residual against the
    untruncated merge is within 1% of the exact truncation's (NumPy SVD)."""
    flags = ["--method", "ties", "--space", "delta", "--density", "0.5"]
    out = tmp_path / "randomized"
    assert (
        main(
            [
                "merge",
                "--adapters",
                str(library),
                "--out",
                str(out),
                *flags,
                "--truncation",
                "randomized",
            ]
        )
        == 0
    )
    assert json.loads((out / "d2c_jax.json").read_text())["truncation"] == "randomized"
    lib = AdapterLibrary.load(library)
    config = MergeConfig("ties", space="delta", density=0.5)
    full = merge(
        lib.params, lib.scale, jnp.ones((1, 3)), config, names=lib.names, return_delta=True
    )
    loaded = peft_deltas(out)
    for m in TARGETS:
        delta = np.asarray(full.delta[m]["delta"][0], np.float64)
        s = np.linalg.svd(delta, compute_uv=False)
        best = np.sqrt(np.sum(s[:, 4:] ** 2, axis=-1))
        residual = np.linalg.norm(delta - loaded[m], axis=(-2, -1))
        assert np.all(residual <= best * 1.01 + 1e-6) and np.all(residual >= best * (1 - 1e-4))


def test_adapter_dirs_and_library_dir_give_the_same_adapter(library, tmp_path):
    flags = ["--method", "linear", "--space", "factor"]
    dirs = [str(library / name) for name in ("de", "fr", "it")]
    assert main(["merge", "--adapters", *dirs, "--out", str(tmp_path / "a"), *flags]) == 0
    assert main(["merge", "--adapters", str(library), "--out", str(tmp_path / "b"), *flags]) == 0
    a, b = peft_deltas(tmp_path / "a"), peft_deltas(tmp_path / "b")
    for m in TARGETS:
        np.testing.assert_array_equal(a[m], b[m])


def test_refuses_to_overwrite_unless_forced(library, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    flags = ["merge", "--adapters", str(library), "--out", str(out), "--method", "linear"]
    # A directory that is not a previous merge output is never replaced, --force or not.
    assert main(flags) == 2
    assert "not a previous output of `d2c merge`" in capsys.readouterr().err
    assert main([*flags, "--force"]) == 2
    assert "not a previous output of `d2c merge`" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    # An empty directory is written into; a previous merge output needs --force.
    assert main(flags) == 0
    assert main(flags) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main([*flags, "--force"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "no leftovers beside OUT"


def test_interrupted_write_leaves_no_output(library, tmp_path, monkeypatch):
    import d2c_jax.library

    def crash(directory, *args, **kwargs):
        (directory / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(d2c_jax.library, "write_peft_files", crash)
    out = tmp_path / "merged"
    # Ctrl-C is reported as one line with exit status 130, not a traceback.
    rc = main(["merge", "--adapters", str(library), "--out", str(out), "--method", "linear"])
    assert rc == 130
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "ties"], "--density is required"),
        (["--method", "linear", "--weights", "1", "2"], "--weights has 2 values for 3 adapters"),
        (["--method", "linear", "--density", "0.5"], "--density does not apply"),
    ],
)
def test_bad_flags_exit_2_with_a_message(library, tmp_path, capsys, flags, message):
    code = main(["merge", "--adapters", str(library), "--out", str(tmp_path / "o"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_adapter_dir_is_reported(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert (
        main(
            [
                "merge",
                "--adapters",
                str(missing),
                "--out",
                str(tmp_path / "o"),
                "--method",
                "linear",
            ]
        )
        == 2
    )
    assert str(missing) in capsys.readouterr().err


def test_help_lists_the_merge_flags(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--adapters",
        "--out",
        "--method",
        "--space",
        "--density",
        "--weights",
        "--trim",
        "--majority",
        "--sign-vote",
        "--divisor",
        "--lambda",
        "--seed",
        "--force",
    ):
        assert flag in text
