"""The `d2c` commands end to end on other model families than Llama, and on PEFT layouts.

For every registered family (Phi-3 through its fused ``qkv_proj``), a tiny random model
written by transformers (`tests.test_families`) carries a library of four PEFT adapters
on its q and v modules. `d2c merge` (linear and TIES, factor space) must write the factors
PEFT's own ``add_weighted_adapter`` computes; `d2c cluster --method d2c` and `d2c
evaluate` must run on it and write their outputs. Then two layouts through the CLI: a
multimodal (``language_model``) library keeps its keys in merged outputs, and adapters
that all skip the base's last layer (``layers_to_transform``) score as PEFT scores them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from d2c_jax.cli import main
from tests.test_families import CASES, _torch_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from safetensors.numpy import load_file  # noqa: E402

FAMILIES = tuple(sorted(CASES))  # every registered family
TASKS = ("t0", "t1", "t2", "t3")
WORDS = ("cat", "dog", "sun", "sky", "tree", "jax")


def _write_tasks(root, splits=("dev", "test"), n=2) -> None:
    """<root>/<task>/<split>.jsonl for every task of TASKS, a few tiny examples each."""
    rng = np.random.default_rng(0)
    for task in TASKS:
        (root / task).mkdir(parents=True)
        for split in splits:
            rows = [
                {"prompt": f"{task} {rng.choice(WORDS)}", "target": str(rng.choice(WORDS))}
                for _ in range(n)
            ]
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _peft_library(model_type, root, **lora):
    """Four PEFT adapters (r=4, alpha=8, non-zero B) on `model_type`'s q and v modules
    (or `lora`'s settings), one torch seed each, under root/<task>."""
    for i, task in enumerate(TASKS):
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=list(CASES[model_type][1]),
            init_lora_weights=False,
            **lora,
        )
        torch.manual_seed(100 + i)
        peft.get_peft_model(_torch_model(model_type), config).save_pretrained(str(root / task))


@pytest.fixture(scope="module", params=FAMILIES)
def family_world(request, tmp_path_factory, tiny_tokenizer):
    """``(model_type, root)``: root/base (the transformers model and the tiny
    tokenizer), root/library (four PEFT adapters), root/tasks (dev and test splits)."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    _torch_model(model_type).save_pretrained(str(root / "base"))
    tiny_tokenizer.save_pretrained(str(root / "base"))
    _peft_library(model_type, root / "library")
    _write_tasks(root / "tasks")
    return model_type, root


def _peft_merge(model_type, library, combination, weights, density=None) -> dict:
    """PEFT's ``add_weighted_adapter`` of the library's adapters: ``{PEFT key: array}``
    of the merged adapter's lora_A / lora_B, keyed as a saved adapter is."""
    model = peft.PeftModel.from_pretrained(
        _torch_model(model_type), str(library / TASKS[0]), adapter_name=TASKS[0]
    )
    for task in TASKS[1:]:
        model.load_adapter(str(library / task), adapter_name=task)
    model.add_weighted_adapter(
        adapters=list(TASKS),
        weights=list(weights),
        adapter_name="merged",
        combination_type=combination,
        density=density,
    )
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            assert module.scaling["merged"] == 1.0  # alpha = r, like ours
            for side in "AB":
                layer = getattr(module, f"lora_{side}")["merged"]
                out[f"{name}.lora_{side}.weight"] = layer.weight.detach().numpy()
    return out


# Ours (linear: weighted mean, so PEFT gets the weights normalised; TIES: PEFT's defaults).
MERGES = {
    "linear": (["--method", "linear"], ("linear", [0.25] * 4, None)),
    "ties": (["--method", "ties", "--density", "0.5"], ("ties", [1.0] * 4, 0.5)),
}


@pytest.mark.parametrize("merge", sorted(MERGES))
def test_merge_equals_peft_add_weighted_adapter(family_world, tmp_path, merge):
    model_type, root = family_world
    flags, (combination, weights, density) = MERGES[merge]
    out = tmp_path / "merged"
    argv = ["merge", "--adapters", str(root / "library"), "--space", "factor", *flags]
    assert main([*argv, "--dtype", "float32", "--out", str(out)]) == 0
    ours = load_file(str(out / "adapter_model.safetensors"))
    theirs = _peft_merge(model_type, root / "library", combination, weights, density)
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 2 * 3 * len(CASES[model_type][1])  # A and B, 3 layers, modules
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-5, atol=1e-5, err_msg=key)


def test_cluster_d2c_and_evaluate_run_end_to_end(family_world, tmp_path):
    model_type, root = family_world
    clusters, scores = tmp_path / "clusters", tmp_path / "scores.json"
    common = ["--base", str(root / "base"), "--library", str(root / "library")]
    tasks = ["--tasks", str(root / "tasks")]
    argv = ["cluster", "--method", "d2c", *common, *tasks, "--budget", "2", "--init", "random"]
    argv += ["--merge", "ties", "--density", "0.5", "--max-iters", "2", "--seed", "3"]
    assert main([*argv, "--out", str(clusters)]) == 0
    assignment = json.loads((clusters / "assignment.json").read_text())
    assert sorted(assignment) == list(TASKS) and set(assignment.values()) == {0, 1}
    manifest = json.loads((clusters / "manifest.json").read_text())
    assert manifest["k"] == 2 and manifest["dev_objective"] > 0
    assert manifest["base_fingerprint"]
    for c in (0, 1):
        saved = json.loads((clusters / f"cluster_{c}" / "adapter_config.json").read_text())
        assert saved["target_modules"] == sorted(CASES[model_type][1])

    argv = ["evaluate", *common, *tasks, "--assignment", str(clusters)]
    assert main([*argv, "--max-new-tokens", "3", "--out", str(scores)]) == 0
    result = json.loads(scores.read_text())
    assert set(result["per_task"]) == set(TASKS), sorted(result)


# ------------------------------------------------------------------ PEFT layouts


LANGUAGE_MODEL = "base_model.model.model.language_model."


def test_multimodal_library_merges_keep_their_language_model_keys(tmp_path, tiny_config):
    """A Gemma 3 multimodal checkpoint's adapters live under ``language_model.``; the
    merge and a clustering's merged adapters are written back under the same keys."""
    import jax.numpy as jnp

    from d2c_jax.library import AdapterLibrary, save_peft_adapter
    from tests.conftest import random_lora

    library = tmp_path / "library"
    params = random_lora(tiny_config, n=len(TASKS), seed=5)
    for i, task in enumerate(TASKS):
        save_peft_adapter(
            library / task,
            {m: {f: jnp.asarray(x[i]) for f, x in fs.items()} for m, fs in params.items()},
            rank=4,
            alpha=8,
            base_model="tiny-gemma3",
            dtype=jnp.float32,
            key_prefix=LANGUAGE_MODEL,
        )
    merged, clusters = tmp_path / "merged", tmp_path / "clusters"
    argv = ["merge", "--adapters", str(library), "--method", "linear", "--out", str(merged)]
    assert main(argv) == 0
    argv = ["cluster", "--method", "kmeans", "--library", str(library), "--budget", "2"]
    assert main([*argv, "--out", str(clusters)]) == 0
    for out in (merged, clusters / "cluster_0", clusters / "cluster_1"):
        keys = sorted(load_file(str(out / "adapter_model.safetensors")))
        assert keys and all(k.startswith(f"{LANGUAGE_MODEL}layers.") for k in keys), keys[:2]
        assert AdapterLibrary.load([out]).key_prefix == LANGUAGE_MODEL


def _nll_under_peft(peft_model, tokenizer, rows) -> list[float]:
    """Per-example NLL by the loss convention (target tokens and eos), in torch."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        target = tokenizer(row["target"], add_special_tokens=False)["input_ids"]
        ids = prompt + target + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = peft_model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        labels = torch.tensor(ids[1:])
        token_nll = -logp[torch.arange(len(ids) - 1), labels]
        out.append(float(token_nll[len(prompt) - 1 :].mean()))
    return out


def test_adapters_that_skip_the_last_layer_fit_the_base(tmp_path, tiny_hf_dir, tiny_tokenizer):
    """PEFT ``layers_to_transform=[0]`` on a 2-layer base: the library stacks to the
    base's depth (zero last layer), so `d2c score` gives PEFT's NLL, `d2c cluster
    --method d2c` runs, and `d2c evaluate` takes a clustering made without the base
    (kmeans: merged adapters of one layer) and the library's single adapters."""
    from transformers import AutoModelForCausalLM

    library, tasks = tmp_path / "library", tmp_path / "tasks"
    for i, task in enumerate(TASKS):
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            layers_to_transform=[0],
            init_lora_weights=False,
        )
        torch.manual_seed(200 + i)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32)
        with torch.no_grad():  # PEFT's default B is small: make the adapter matter
            peft_model = peft.get_peft_model(model, config)
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(50.0)
        peft_model.save_pretrained(str(library / task))
    _write_tasks(tasks)
    rows = [json.loads(line) for line in (tasks / "t3" / "dev.jsonl").read_text().splitlines()]
    out = tmp_path / "score.json"
    argv = ["score", "--base", str(tiny_hf_dir), "--adapter", str(library / "t3")]
    assert main([*argv, "--examples", str(tasks / "t3" / "dev.jsonl"), "--out", str(out)]) == 0
    ours = json.loads(out.read_text())["per_example_nll"]
    theirs = _nll_under_peft(peft_model.eval(), tiny_tokenizer, rows)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter():
        base = _nll_under_peft(peft_model, tiny_tokenizer, rows)
    assert np.abs(np.asarray(theirs) - base).max() > 1e-3  # the adapter matters

    clusters = tmp_path / "clusters"
    argv = ["cluster", "--method", "d2c", "--base", str(tiny_hf_dir), "--library", str(library)]
    argv += ["--tasks", str(tasks), "--budget", "2", "--init", "random", "--max-iters", "1"]
    assert main([*argv, "--out", str(clusters)]) == 0
    merged = load_file(str(clusters / "cluster_0" / "adapter_model.safetensors"))
    assert any(".layers.1." in k for k in merged)  # written at the base's depth

    shallow, scores = tmp_path / "kmeans", tmp_path / "scores.json"
    argv = ["cluster", "--method", "kmeans", "--library", str(library), "--budget", "2"]
    assert main([*argv, "--base", str(tiny_hf_dir), "--out", str(shallow)]) == 0
    merged = load_file(str(shallow / "cluster_0" / "adapter_model.safetensors"))
    assert not any(".layers.1." in k for k in merged)  # no base: the library's own depth
    argv = ["evaluate", "--base", str(tiny_hf_dir), "--library", str(library)]
    argv += ["--tasks", str(tasks), "--assignment", str(shallow), "--max-new-tokens", "2"]
    assert main([*argv, "--out", str(scores)]) == 0
    assert set(json.loads(scores.read_text())["per_task"]) == set(TASKS)
