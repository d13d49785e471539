"""`d2c export`: llama.cpp LoRA adapter GGUFs of a clustering, checked three ways.

1. The file itself (gguf.GGUFReader): llama.cpp's metadata keys, tensor names and
   shapes, and ``alpha / r * lora_b @ lora_a`` equal to our ``scale * B @ A`` once the
   q/k row permutation is undone (NumPy reference).
2. Its meaning without llama.cpp: a base GGUF whose weights are the file weights plus
   the adapter's file-layout delta loads (through our own un-permuting loader) into
   the same model as base + adapter.
3. llama.cpp itself (``llama-cpp-python``, skipped when it is not installed): logits
   of the tiny random model with an exported adapter equal ours to float32 rounding,
   and a wrongly permuted export does not; on the embedded SmolLM2 (slow), logits
   stay within the no-adapter difference (Q4_1 with quantized activations) and
   greedy answers agree on >= 95% of the dev examples of the exported adapters.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from d2c_jax.cli import main
from d2c_jax.export import (
    ROUTING_NAME,
    GGUFBase,
    export_clusters,
    permute_qk,
    read_gguf_adapter,
    write_gguf_adapter,
)
from d2c_jax.models.families.base import LLAMA_GGUF_NAMES
from d2c_jax.models.gguf import unpermute_qk
from tests.conftest import numpy_weights, write_tiny_gguf

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_base):
    path = tmp_path_factory.mktemp("export_base") / "tiny.gguf"
    weights = numpy_weights(tiny_base.model)
    # one merge for llama.cpp's loader; ids are fed directly, so it never tokenizes
    return write_tiny_gguf(path, tiny_base.config, weights, tiny_base.tokenizer, merges=["a b"])


@pytest.fixture(scope="module")
def all_modules_adapter(tiny_config):
    from tests.conftest import random_lora

    return random_lora(tiny_config, modules=ALL_MODULES, rank=4, seed=3, std=0.3), 1.5


def file_tensors(path):
    """``{name: row-major float32 array}`` of a GGUF, in file layout (nothing undone)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        out[t.name] = array.reshape(tuple(reversed([int(x) for x in t.shape])))
    return reader, out


# ------------------------------------------------------------------ the file itself


def test_permute_qk_is_llama_cpps_and_inverts_our_loader():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    p = permute_qk(w, 4)
    # within each head of dim 16, rows go 0, 8, 1, 9, ... (interleaved RoPE pairs)
    np.testing.assert_array_equal(p[:4, 0], w[[0, 8, 1, 9], 0])
    np.testing.assert_array_equal(p[16:18, 0], w[[16, 24], 0])
    np.testing.assert_array_equal(unpermute_qk(p, 4), w)
    with pytest.raises(ValueError, match="heads"):
        permute_qk(np.zeros((6, 2)), 4)


def test_file_has_llama_cpp_keys_names_shapes_and_our_delta(
    tmp_path, tiny_gguf, tiny_config, all_modules_adapter
):
    params, scale = all_modules_adapter
    base = GGUFBase.read(tiny_gguf)
    path = tmp_path / "a.gguf"
    size = write_gguf_adapter(path, params, scale, base, dtype="f32", name="c0", tasks=["x", "y"])
    assert size == path.stat().st_size
    reader, tensors = file_tensors(path)
    meta = {k: reader.fields[k].contents() for k in reader.fields if not k.startswith("GGUF.")}
    rank = 4
    assert meta["general.type"] == "adapter"
    assert meta["general.architecture"] == "llama"
    assert meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(scale * rank)
    assert meta["adapter.lora.task_name"] == "x,y"
    assert meta["general.name"] == "c0"
    # llama.cpp: a.ne = [d_in, r], b.ne = [r, d_out], W.ne = [d_in, d_out]
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert len(shapes) == 2 * len(ALL_MODULES) * tiny_config.num_layers
    for module in ALL_MODULES:
        d_out, d_in = tiny_config.module_shape(module)
        gname = LLAMA_GGUF_NAMES[module]
        heads = {"q_proj": tiny_config.num_heads, "k_proj": tiny_config.num_kv_heads}
        for layer in range(tiny_config.num_layers):
            name = f"blk.{layer}.{gname}.weight"
            assert shapes[f"{name}.lora_a"] == (d_in, rank)
            assert shapes[f"{name}.lora_b"] == (rank, d_out)
            lora_a, lora_b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
            file_delta = meta["adapter.lora.alpha"] / rank * lora_b @ lora_a
            if module in heads:
                file_delta = unpermute_qk(file_delta, heads[module])
            want = scale * params[module]["B"][layer] @ params[module]["A"][layer]
            np.testing.assert_allclose(file_delta, want, rtol=1e-5, atol=1e-6)
            if module in heads:  # the permutation really moved rows
                raw = meta["adapter.lora.alpha"] / rank * lora_b @ lora_a
                assert np.abs(raw - want).max() > 1e-2
    # our reader inverts the writer
    back, back_scale = read_gguf_adapter(path, base)
    assert back_scale == pytest.approx(scale)
    for module in ALL_MODULES:
        for f in "AB":
            np.testing.assert_array_equal(back[module][f], params[module][f])


@pytest.mark.parametrize("dtype, bytes_per_value", [("bf16", 2), ("f16", 2), ("f32", 4)])
def test_dtypes(tmp_path, tiny_gguf, all_modules_adapter, dtype, bytes_per_value):
    params, scale = all_modules_adapter
    base = GGUFBase.read(tiny_gguf)
    size = write_gguf_adapter(tmp_path / "a.gguf", params, scale, base, dtype=dtype)
    values = sum(f["A"].size + f["B"].size for f in params.values())
    assert values * bytes_per_value < size < values * bytes_per_value + 64 * 1024
    back, _ = read_gguf_adapter(tmp_path / "a.gguf", base)
    for module in ALL_MODULES:
        for f in "AB":
            np.testing.assert_allclose(back[module][f], params[module][f], rtol=1e-2, atol=1e-3)
    # bf16 values (what our PEFT files hold) survive exactly
    bf = {
        m: {
            f: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
            for f, x in fs.items()
        }
        for m, fs in params.items()
    }
    write_gguf_adapter(tmp_path / "b.gguf", bf, scale, base, dtype="bf16")
    back, _ = read_gguf_adapter(tmp_path / "b.gguf", base)
    np.testing.assert_array_equal(back["q_proj"]["B"], bf["q_proj"]["B"])


def test_adapter_that_does_not_fit_the_base_is_refused(tmp_path, tiny_gguf, tiny_config):
    from tests.conftest import random_lora, tiny_llama_config

    base = GGUFBase.read(tiny_gguf)
    wide = random_lora(tiny_llama_config(hidden_size=32, num_heads=2, num_kv_heads=1))
    with pytest.raises(ValueError, match="wrong base model"):
        write_gguf_adapter(tmp_path / "a.gguf", wide, 1.0, base, name="wide")
    deep = random_lora(tiny_llama_config(num_layers=3))
    with pytest.raises(ValueError, match="3 layers"):
        write_gguf_adapter(tmp_path / "a.gguf", deep, 1.0, base, name="deep")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(FileNotFoundError, match="not found"):
        GGUFBase.read(tmp_path / "missing.gguf")
    adapter = tmp_path / "adapter.gguf"
    write_gguf_adapter(adapter, random_lora(tiny_config), 1.0, base)
    with pytest.raises(ValueError, match="not a base model"):
        GGUFBase.read(adapter)


def test_folding_the_file_delta_into_the_base_gives_base_plus_adapter(
    tmp_path, tiny_base, tiny_gguf, all_modules_adapter, monkeypatch
):
    """What llama.cpp computes, W_file + alpha/r * lora_b @ lora_a in file layout, loads
    through our (un-permuting) GGUF loader as base + adapter."""
    from d2c_jax.models import load_base

    params, scale = all_modules_adapter
    base = GGUFBase.read(tiny_gguf)
    write_gguf_adapter(tmp_path / "a.gguf", params, scale, base, dtype="f32")
    reader, tensors = file_tensors(tmp_path / "a.gguf")
    alpha = reader.fields["adapter.lora.alpha"].contents()
    added = {
        name[: -len(".lora_a")]: alpha / 4 * tensors[name[:-1] + "b"] @ tensors[name]
        for name in tensors
        if name.endswith(".lora_a")
    }
    config = tiny_base.config
    folded = write_tiny_gguf(
        tmp_path / "folded.gguf", config, numpy_weights(tiny_base.model), tiny_base.tokenizer, added
    )
    monkeypatch.setenv("D2C_CACHE", str(tmp_path / "cache"))
    model = load_base(str(folded))
    ids = np.random.default_rng(0).integers(3, 259, (2, 24)).astype(np.int32)
    ours = np.asarray(tiny_base.model(ids, adapter=params, scale=scale))
    np.testing.assert_allclose(np.asarray(model.model(ids)), ours, atol=1e-4)
    assert np.abs(ours - np.asarray(tiny_base.model(ids))).max() > 0.1  # adapter matters


# ------------------------------------------------------------------ whole clusterings


TASKS = ("alpha", "beta", "delta", "gamma")


@pytest.fixture(scope="module")
def clustering(tmp_path_factory, tiny_config):
    from d2c_jax.cluster.output import save_clusters
    from d2c_jax.library import AdapterLibrary
    from d2c_jax.merging import DEFAULT_MERGE
    from tests.conftest import save_random_library

    root = tmp_path_factory.mktemp("export_clusters")
    save_random_library(root / "library", tiny_config, TASKS, seed=5, std=0.3)
    library = AdapterLibrary.load(root / "library")
    save_clusters(root / "clustering", library, np.asarray([0, 1, 0, 1]), DEFAULT_MERGE)
    return root


def snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_export_clusters_writes_files_and_routing(tmp_path, clustering, tiny_gguf):
    from d2c_jax.cluster.output import load_clusters
    from d2c_jax.export import sha256_file

    before = snapshot(clustering)
    out = tmp_path / "device"
    manifest = export_clusters(
        clustering / "clustering", out, tiny_gguf, library_dir=clustering / "library"
    )
    assert snapshot(clustering) == before  # inputs untouched
    assert sorted(p.name for p in out.iterdir()) == [
        "cluster_0.gguf",
        "cluster_1.gguf",
        ROUTING_NAME,
    ]
    assert json.loads((out / ROUTING_NAME).read_text()) == manifest
    assert manifest["routes"] == {
        "alpha": "cluster_0.gguf",
        "beta": "cluster_1.gguf",
        "delta": "cluster_0.gguf",
        "gamma": "cluster_1.gguf",
    }
    assert manifest["base_model"]["sha256"] == sha256_file(tiny_gguf)
    assert manifest["base_model"]["file_name"] == "tiny.gguf"
    assert manifest["adapters"]["cluster_0"]["members"] == ["alpha", "delta"]
    storage = manifest["storage"]
    sizes = [(out / f"cluster_{c}.gguf").stat().st_size for c in (0, 1)]
    assert storage["adapters_bytes"] == sum(sizes)
    assert storage["num_single_adapters"] == 4
    # every file holds one rank-4 adapter, so K files weigh about K/N of the N singles
    assert storage["fraction"] == pytest.approx(0.5, rel=0.02)
    assert manifest["adapters"]["cluster_1"]["sha256"] == sha256_file(out / "cluster_1.gguf")
    # the files hold the clusters' merged adapters
    assignment, merged = load_clusters(clustering / "clustering")
    base = GGUFBase.read(tiny_gguf)
    for c in (0, 1):
        want, want_scale = merged.adapter(merged.index(f"cluster_{c}"))
        got, got_scale = read_gguf_adapter(out / f"cluster_{c}.gguf", base)
        assert got_scale == pytest.approx(want_scale)
        for m in want:
            np.testing.assert_array_equal(got[m]["B"], np.asarray(want[m]["B"]))
    with pytest.raises(FileExistsError):
        export_clusters(clustering / "clustering", out, tiny_gguf)
    export_clusters(clustering / "clustering", out, tiny_gguf, overwrite=True)
    assert json.loads((out / ROUTING_NAME).read_text())["storage"]["single_adapters_bytes"] is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_cli_export(tmp_path, clustering, tiny_gguf, capsys):
    out = tmp_path / "device"
    args = ["export", "--clusters", str(clustering / "clustering"), "--format", "gguf"]
    args += ["--out", str(out), "--base", str(tiny_gguf), "--dtype", "f32"]
    assert main([*args, "--library", str(clustering / "library")]) == 0
    printed = capsys.readouterr().out
    assert "2 adapters" in printed and "4 single adapters (50" in printed and str(out) in printed
    first = (out / "cluster_0.gguf").read_bytes()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert (out / "cluster_0.gguf").read_bytes() == first  # deterministic


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, r: a.__setitem__(2, str(r / "nope")), "--clusters .*nope: no such directory"),
        (lambda a, r: a.__setitem__(2, str(r / "library")), "no assignment.json"),
        (lambda a, r: a.__setitem__(6, str(r / "nope.gguf")), "--base .*nope.gguf: no such file"),
        (lambda a, r: a.__setitem__(6, str(r / "library")), "is not a .gguf file"),
        (lambda a, r: a.__setitem__(4, str(r / "clustering" / "x")), "inside the input --clusters"),
    ],
)
def test_cli_export_bad_input_names_the_argument(
    tmp_path, clustering, tiny_gguf, capsys, change, message
):
    import re

    args = ["export", "--clusters", str(clustering / "clustering")]
    args += ["--out", str(tmp_path / "device"), "--base", str(tiny_gguf)]
    change(args, clustering)
    before = snapshot(clustering)
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert snapshot(clustering) == before
    assert not (tmp_path / "device").exists()


def test_cli_export_refuses_to_replace_a_foreign_directory(tmp_path, clustering, tiny_gguf, capsys):
    out = tmp_path / "device"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    args = ["export", "--clusters", str(clustering / "clustering"), "--out", str(out)]
    assert main([*args, "--base", str(tiny_gguf), "--force"]) == 2
    assert "not a previous output of `d2c export`" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep"


# ------------------------------------------------------------------ llama.cpp itself


def llama(model_path, lora_path=None, *, logits_all=True, n_ctx=256, verbose=False, kv=None):
    """llama.cpp with its defaults (f16 KV cache) unless ``kv="f32"`` (exactness)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    kv_type = (
        {} if kv is None else {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    )
    return llama_cpp.Llama(
        **kv_type,
        model_path=str(model_path),
        lora_path=None if lora_path is None else str(lora_path),
        logits_all=logits_all,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=2,
        seed=0,
        verbose=verbose,
    )


def llama_cpp_logits(llm, ids):
    llm.reset()
    llm.eval([int(i) for i in ids])
    return np.array(llm.scores[: len(ids)], np.float32)


def test_llama_cpp_logits_equal_ours_on_the_tiny_model(
    tmp_path, tiny_base, tiny_gguf, all_modules_adapter, capfd, monkeypatch
):
    pytest.importorskip("llama_cpp")
    params, scale = all_modules_adapter
    base = GGUFBase.read(tiny_gguf)
    path = tmp_path / "a.gguf"
    write_gguf_adapter(path, params, scale, base, dtype="f32")
    ids = np.random.default_rng(1).integers(3, 259, 40).astype(np.int32)
    ours = np.asarray(tiny_base.model(ids[None], adapter=params, scale=scale))[0]
    plain = np.asarray(tiny_base.model(ids[None]))[0]

    capfd.readouterr()
    llm = llama(tiny_gguf, path, verbose=True, kv="f32")
    log = capfd.readouterr().err
    assert f"loaded {2 * len(ALL_MODULES) * base.num_layers} tensors from lora file" in log
    lora_lines = [line for line in log.splitlines() if "lora" in line.lower()]
    bad = ("cannot", "fallback", "error", "warn", "fail")
    assert not [line for line in lora_lines if any(b in line.lower() for b in bad)], lora_lines
    theirs = llama_cpp_logits(llm, ids)
    print("tiny: max |llama.cpp - ours| with adapter", np.abs(theirs - ours).max())
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=0)
    plain_llm = llama(tiny_gguf, kv="f32")
    np.testing.assert_allclose(llama_cpp_logits(plain_llm, ids), plain, atol=2e-4, rtol=0)
    assert np.abs(ours - plain).max() > 0.5  # the adapter matters

    # the q/k permutation is needed: an export without it disagrees
    unpermuted = dataclasses.replace(base, permute_qk=False)
    write_gguf_adapter(tmp_path / "wrong.gguf", params, scale, unpermuted, dtype="f32")
    wrong = llama_cpp_logits(llama(tiny_gguf, tmp_path / "wrong.gguf", kv="f32"), ids)
    print("tiny: without the q/k permutation", np.abs(wrong - ours).max())
    assert np.abs(wrong - ours).max() > 0.05


# three clusters: numbers-to-words in French and German merged; names in English and
# in Italian, each alone (a one-member cluster keeps its trained adapter)
REAL_TASKS = ("numwords_fr", "numwords_de", "name_en", "name_it")


def _real_clustering(tmp_path_factory):
    """Three clusters of four embedded-library tasks, merged with the default merge."""
    from d2c_jax.cluster.output import save_clusters
    from d2c_jax.library import AdapterLibrary, embedded_library_dir
    from d2c_jax.merging import DEFAULT_MERGE

    root = tmp_path_factory.mktemp("export_real")
    library = AdapterLibrary.load([embedded_library_dir() / t for t in REAL_TASKS])
    save_clusters(root / "clustering", library, np.asarray([0, 0, 1, 2]), DEFAULT_MERGE)
    return root


def dequantized_copy(src, dst):
    """`src` GGUF with every tensor dequantized to F32 (metadata copied): llama.cpp then
    multiplies in float32, so comparing it with our model isolates the adapter export
    from llama.cpp's quantized activations."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture",):
            continue
        if field.name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape([int(x) for x in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llama_greedy(llm, ids, stops, max_new_tokens=32):
    """llama.cpp's greedy continuation of `ids` (argmax of its own logits)."""
    llm.reset()
    llm.eval([int(i) for i in ids])
    out = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt in stops:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out


@pytest.mark.slow
def test_llama_cpp_matches_ours_on_smollm2(tmp_path_factory, real_base):
    """Logits and greedy answers of llama.cpp with the exported adapters against our
    float32 model with the same adapters, on two bases:

    * the embedded Q4_1 file, as a device runs it: our model dequantizes the weights
      to float32, llama.cpp also quantizes the activations (Q8_1) for those matmuls,
      so the logits differ already without any adapter (max over vocabulary and
      positions: 1.4 to 3.6 here); the difference with an adapter must stay within
      twice that floor, while the adapter itself moves the logits 10x more;
    * the same weights dequantized to F32 (`dequantized_copy`): float32 on both
      sides, so what is left is the export itself, the order of float sums and
      llama.cpp's f16 KV cache: without an adapter the logits differ by 0.05 at most
      here; with one, the difference must stay within 3x that floor (measured 1.4x
      to 1.8x, 0.07 to 0.10 against an adapter effect of 30 to 39), and greedy
      answers must agree on at least 95% of the dev examples of every exported
      adapter, merged ones included (measured: 40 of 40).
    """
    pytest.importorskip("llama_cpp")
    from d2c_jax.cluster.output import load_clusters
    from d2c_jax.evaluate import normalize
    from d2c_jax.generation import generate
    from d2c_jax.models import default_gguf_path
    from d2c_jax.tasks import load_split

    root = _real_clustering(tmp_path_factory)
    base_file = default_gguf_path()
    f32_file = dequantized_copy(base_file, root / "base-f32.gguf")
    manifest = export_clusters(root / "clustering", root / "device", base_file)
    _, merged = load_clusters(root / "clustering")
    tok = real_base.tokenizer
    stops = {tok.eos_token_id, tok.get_vocab()["<|endoftext|>"]}
    plain = {"q4_1": llama(base_file), "f32": llama(f32_file)}

    def chat_ids(prompt, target=""):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tok(text + target, add_special_tokens=False)["input_ids"]

    report = {}
    for cluster, info in manifest["adapters"].items():
        params, scale = merged.adapter(merged.index(cluster))
        examples = [e for t in info["tasks"] for e in load_split(None, t, "dev")]
        prompts = [e["prompt"] for e in examples]
        ours_text = generate(real_base, (params, scale), prompts, max_new_tokens=32)
        row = {"examples": len(prompts), "members": len(info["members"])}
        for kind, base in (("q4_1", base_file), ("f32", f32_file)):
            llm = llama(base, root / "device" / info["file"])
            diffs, floors, effects = [], [], []
            for e in examples[::4]:  # logits on prompt + target, a few examples
                ids = chat_ids(e["prompt"], e["target"])
                ours = np.asarray(real_base.model(np.asarray([ids]), adapter=params, scale=scale))
                bare = np.asarray(real_base.model(np.asarray([ids])))
                diffs.append(np.abs(llama_cpp_logits(llm, ids) - ours[0]).max())
                floors.append(np.abs(llama_cpp_logits(plain[kind], ids) - bare[0]).max())
                effects.append(np.abs(ours - bare).max())
            agree = sum(
                normalize(
                    tok.decode(llama_greedy(llm, chat_ids(p), stops), skip_special_tokens=True)
                )
                == normalize(mine)
                for p, mine in zip(prompts, ours_text, strict=True)
            )
            row[kind] = {
                "max_logit_diff": float(max(diffs)),
                "floor_no_adapter": float(max(floors)),
                "adapter_effect": float(min(effects)),
                "greedy_agreement": agree / len(prompts),
            }
        report[cluster] = row
    print(json.dumps(report, indent=1))
    for r in report.values():
        q4, f32 = r["q4_1"], r["f32"]
        assert q4["max_logit_diff"] <= 2 * q4["floor_no_adapter"]
        assert q4["adapter_effect"] > 3 * q4["max_logit_diff"]
        assert f32["max_logit_diff"] <= 3 * f32["floor_no_adapter"]
        assert f32["adapter_effect"] > 100 * f32["max_logit_diff"]
        assert f32["greedy_agreement"] >= 0.95
