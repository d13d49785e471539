"""`d2c_jax.scoring`: losses, candidate scoring, parity with transformers + PEFT, and
the `score` CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from d2c_jax.cli import main as cli_main
from d2c_jax.examples import encode_examples
from d2c_jax.scoring import (
    candidate_nll,
    example_nll,
    score_candidates,
    score_examples,
    task_mean_nll,
)
from kernels.lora import dense_delta

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


# ------------------------------------------------------------------ losses


def test_padding_never_changes_a_loss(tiny_base, tiny_examples, make_lora):
    lora = make_lora(tiny_base.config)
    short = encode_examples(tiny_base, tiny_examples[:1])
    padded = encode_examples(tiny_base, tiny_examples[:1], pad_to=64)
    batch = encode_examples(tiny_base, tiny_examples)
    f = jax.jit(example_nll)
    a = np.asarray(f(tiny_base, lora, 2.0, short.tokens, short.loss_mask))
    b = np.asarray(f(tiny_base, lora, 2.0, padded.tokens, padded.loss_mask))
    c = np.asarray(f(tiny_base, lora, 2.0, batch.tokens, batch.loss_mask))
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(c[:1], a, rtol=1e-5)
    # the pad token id does not matter either
    other = padded.tokens.copy()
    other[:, padded.lengths[0] :] = 77
    np.testing.assert_allclose(f(tiny_base, lora, 2.0, other, padded.loss_mask), a, rtol=1e-5)


def test_max_labels_compaction_is_exact(tiny_base, tiny_examples, make_lora):
    lora = make_lora(tiny_base.config)
    enc = encode_examples(tiny_base, tiny_examples)
    full = example_nll(tiny_base, lora, 2.0, enc.tokens, enc.loss_mask)
    compact = example_nll(
        tiny_base,
        lora,
        2.0,
        enc.tokens,
        enc.loss_mask,
        max_labels=int(enc.num_labels.max()),
        vocab_chunk=100,
    )
    np.testing.assert_allclose(compact, full, rtol=1e-5)


# ------------------------------------------------------------------ parity with PEFT


def torch_nll(model, tokens, loss_mask):
    """Per-example mean label NLL computed from full torch logits."""
    logits = model(torch.from_numpy(np.asarray(tokens)).long()).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = torch.from_numpy(np.asarray(tokens[:, 1:])).long()
    nll = -logp.gather(-1, labels[..., None])[..., 0]
    mask = torch.from_numpy(np.asarray(loss_mask[:, 1:]))
    return (nll * mask).sum(1) / mask.sum(1)


def peft_model(hf_dir, modules, rank, alpha, seed):
    base = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def peft_to_ours(model, config, modules):
    state = peft.get_peft_model_state_dict(model)
    out = {}
    for m in modules:
        group = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        key = "base_model.model.model.layers.{}.{}.{}.lora_{}.weight"
        out[m] = {
            f: np.stack(
                [
                    state[key.format(layer, group, m, f)].numpy()
                    for layer in range(config.num_layers)
                ]
            )
            for f in "AB"
        }
    return out


def test_nll_and_grads_match_transformers_peft(tiny_base, tiny_hf_dir, tiny_examples):
    modules = ("q_proj", "v_proj", "down_proj")
    model = peft_model(tiny_hf_dir, modules, rank=4, alpha=8, seed=0)
    lora = peft_to_ours(model, tiny_base.config, modules)
    enc = encode_examples(tiny_base, tiny_examples)
    want = torch_nll(model, enc.tokens, enc.loss_mask)
    got = jax.jit(example_nll)(tiny_base, lora, 2.0, enc.tokens, enc.loss_mask)
    np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), atol=2e-5)
    # gradients of the mean loss w.r.t. the factors (what the trainer uses)
    want.mean().backward()
    grads = jax.grad(lambda ad: example_nll(tiny_base, ad, 2.0, enc.tokens, enc.loss_mask).mean())(
        lora
    )
    for name, p in model.named_parameters():
        if "lora_" in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            module = next(m for m in modules if f".{m}." in name)
            factor = "A" if "lora_A" in name else "B"
            np.testing.assert_allclose(
                np.asarray(grads[module][factor][layer]), p.grad.numpy(), atol=2e-5, rtol=1e-4
            )


# ------------------------------------------------------------------ candidate scoring


def test_vmapped_candidates_equal_scoring_each_alone(tiny_base, tiny_examples, make_lora):
    cfg = tiny_base.config
    bank = encode_examples(tiny_base, tiny_examples)
    stack = make_lora(cfg, modules=("q_proj", "v_proj", "up_proj"), rank=4, n=3, seed=1)
    scale = np.array([2.0, 0.5, 1.0], np.float32)
    idx = np.array([[0, 1, 2, 3, 4], [4, 5, 6, 7, 0], [8, 9, 10, 11, 11]])
    valid = np.ones_like(idx, bool)
    valid[2, 4] = False
    one = jax.jit(example_nll)
    alone = np.stack(
        [
            np.asarray(
                one(
                    tiny_base,
                    jax.tree.map(lambda x, c=c: x[c], stack),
                    scale[c],
                    bank.tokens[idx[c]],
                    bank.loss_mask[idx[c]],
                )
            )
            for c in range(3)
        ]
    )
    alone[~valid] = np.nan
    kernel = jax.jit(candidate_nll)(tiny_base, stack, scale, bank.tokens[idx], bank.loss_mask[idx])
    np.testing.assert_allclose(np.where(valid, kernel, np.nan), alone, rtol=1e-5)
    got = score_candidates(tiny_base, stack, bank, idx, valid, scale=scale, chunk_size=2)
    np.testing.assert_allclose(got, alone, rtol=1e-5)
    # packing several examples per row (here 2-3 per row of 48) is exact
    got, stats = score_candidates(
        tiny_base, stack, bank, idx, valid, scale=scale, pack_len=48, return_stats=True
    )
    assert stats["rows_per_candidate"] < idx.shape[1]
    np.testing.assert_allclose(got, alone, rtol=1e-5)
    got = score_candidates(tiny_base, stack, bank, idx, valid, scale=scale, pack=False)
    np.testing.assert_allclose(got, alone, rtol=1e-5)
    # tiny memory bound -> one candidate per call (the last chunk of 2 is padded), same numbers
    got, stats = score_candidates(
        tiny_base, stack, bank, idx, valid, scale=scale, max_chunk_bytes=1, return_stats=True
    )
    assert stats["chunk_size"] == 1 and stats["chunks"] == 3
    np.testing.assert_allclose(got, alone, rtol=1e-5)
    # dense deltas (scale folded in) give the same losses as the factors
    dense = {m: {"delta": dense_delta(f, scale)} for m, f in stack.items()}
    got = score_candidates(tiny_base, dense, bank, idx, valid, chunk_size=2)
    np.testing.assert_allclose(got, alone, rtol=1e-4)
    # per-task means
    per_task = task_mean_nll(got, bank.task_ids[idx], 3)
    assert per_task.shape == (3, 3) and np.isnan(per_task[0, 2]) and np.isnan(per_task[2, :2]).all()
    np.testing.assert_allclose(per_task[0, 0], alone[0, :4].mean(), rtol=1e-4)
    np.testing.assert_allclose(per_task[1, 0], alone[1, 4], rtol=1e-4)
    np.testing.assert_allclose(per_task[2, 2], alone[2, :4].mean(), rtol=1e-4)


def test_score_candidates_input_errors(tiny_base, tiny_examples, make_lora, make_tiny_config):
    bank = encode_examples(tiny_base, tiny_examples)
    stack = make_lora(tiny_base.config, n=2)
    with pytest.raises(ValueError, match="scale"):
        score_candidates(tiny_base, stack, bank, np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="example_idx"):
        score_candidates(tiny_base, stack, bank, np.zeros((3, 3), int), scale=np.ones(2))
    with pytest.raises(ValueError, match="out of range"):
        score_candidates(tiny_base, stack, bank, np.full((2, 3), 99), scale=np.ones(2))
    wrong = make_lora(make_tiny_config(num_layers=3), n=2)
    with pytest.raises(ValueError, match="does not fit"):
        score_candidates(tiny_base, wrong, bank, np.zeros((2, 3), int), scale=np.ones(2))


def test_score_examples_matches_example_nll(tiny_base, tiny_examples, make_lora):
    lora = make_lora(tiny_base.config)
    enc = encode_examples(tiny_base, tiny_examples)
    want = np.asarray(example_nll(tiny_base, lora, 2.0, enc.tokens, enc.loss_mask))
    got = score_examples(tiny_base, lora, enc, scale=2.0, batch_size=5)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------------------ CLI


@pytest.fixture
def peft_dir(tmp_path, tiny_hf_dir):
    model = peft_model(tiny_hf_dir, ("q_proj", "v_proj"), rank=4, alpha=8, seed=5)
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    return model, out


def test_cli_score_matches_transformers_peft(
    tmp_path, tiny_base, tiny_hf_dir, tiny_examples, peft_dir, capsys, write_jsonl
):
    model, adapter_dir = peft_dir
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    examples = write_jsonl(tmp_path / "ex.jsonl", tiny_examples)
    out = tmp_path / "scores.json"
    code = cli_main(
        [
            "score",
            "--base",
            str(tiny_hf_dir),
            "--adapter",
            str(adapter_dir),
            "--examples",
            str(examples),
            "--out",
            str(out),
            "--batch-size",
            "5",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    enc = encode_examples(tiny_base, tiny_examples)
    want = torch_nll(model, enc.tokens, enc.loss_mask).detach().numpy()
    np.testing.assert_allclose(result["per_example_nll"], want, atol=2e-5)
    np.testing.assert_allclose(result["mean_nll"], want.mean(), atol=2e-5)
    # without an adapter it prints JSON to stdout
    assert cli_main(["score", "--base", str(tiny_hf_dir), "--examples", str(examples)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["per_example_nll"]) == len(tiny_examples)
    assert printed["mean_nll"] != pytest.approx(result["mean_nll"])


def test_cli_errors(tmp_path, tiny_hf_dir, tiny_examples, peft_dir, capsys, write_jsonl):
    good = write_jsonl(tmp_path / "good.jsonl", tiny_examples[:2])
    bad = write_jsonl(tmp_path / "bad.jsonl", [tiny_examples[0], '{"prompt": "x", "target": '])
    cases = [
        (
            ["--base", str(tmp_path / "missing"), "--examples", str(good)],
            "no such file or directory",
        ),
        (["--base", str(tiny_hf_dir), "--examples", str(bad)], "bad.jsonl:2: malformed JSON"),
        (["--base", str(tiny_hf_dir), "--examples", str(tmp_path / "none.jsonl")], "no such file"),
    ]
    for args, message in cases:
        assert cli_main(["score", *args]) == 2
        assert message in capsys.readouterr().err
    # an adapter recording a base that cannot be read (a hub id never downloaded): the
    # weights decide, a differing name alone is a one-line warning (models.identity)
    _, adapter_dir = peft_dir
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-360M"
    cfg_path.write_text(json.dumps(cfg))
    args = ["--base", str(tiny_hf_dir), "--adapter", str(adapter_dir), "--examples", str(good)]
    assert cli_main(["score", *args]) == 0
    err = capsys.readouterr().err
    assert "warning: the adapter records base model 'HuggingFaceTB/SmolLM2-360M'" in err


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_real_model_peft_parity(real_base, tmp_path):
    """SmolLM2 + a random PEFT LoRA on q,v: our NLL equals transformers+PEFT's.

    Tolerance 2e-4 nats: per-token NLLs inherit the ~1e-3 logit differences of
    test_real_model_matches_transformers (massive activation at the document start),
    averaged over ~10 labels and into a log-softmax that is flat in the shared offset.
    """
    from d2c_jax.models.hf import save_hf_weights

    w = real_base.model.weights()
    weights = {k: np.asarray(v) for k, v in w.items() if k != "layers"}
    weights["layers"] = {k: np.asarray(v) for k, v in w["layers"].items()}
    save_hf_weights(tmp_path / "hf", real_base.config, weights)
    model = peft_model(tmp_path / "hf", ("q_proj", "v_proj"), rank=8, alpha=16, seed=0)
    with torch.no_grad():  # random but small: a plausible trained adapter
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.3)
    lora = peft_to_ours(model, real_base.config, ("q_proj", "v_proj"))
    examples = [
        {"prompt": "Translate to French: good morning", "target": "bonjour"},
        {"prompt": "What is 12 + 30?", "target": "42"},
        {"prompt": "The capital of Italy is", "target": " Rome, a city of history."},
    ]
    enc = encode_examples(real_base, examples)
    with torch.no_grad():
        want = torch_nll(model, enc.tokens, enc.loss_mask).numpy()
    got = score_examples(real_base, lora, enc, scale=2.0)
    base_nll = score_examples(real_base, None, enc)
    assert np.abs(base_nll - got).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_correctness_scores_come_from_the_same_pass(tiny_base, tiny_examples, make_lora):
    """``correctness=True``: every `ExampleScores` field equals scoring each candidate
    alone, packed or not, and the NLL field is the NLL-only result."""
    from kernels.loss import ExampleScores

    bank = encode_examples(tiny_base, tiny_examples)
    stack = make_lora(tiny_base.config, n=3, seed=2)
    scale = np.array([2.0, 0.5, 1.0], np.float32)
    idx = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 10]])
    valid = np.ones_like(idx, bool)
    valid[2, 3] = False
    one = jax.jit(example_nll, static_argnames="correctness")
    alone = [
        one(
            tiny_base,
            jax.tree.map(lambda x, c=c: x[c], stack),
            scale[c],
            bank.tokens[idx[c]],
            bank.loss_mask[idx[c]],
            correctness=True,
        )
        for c in range(3)
    ]
    nll_only = score_candidates(tiny_base, stack, bank, idx, valid, scale=scale, chunk_size=2)
    for pack in (True, False):
        got = score_candidates(
            tiny_base,
            stack,
            bank,
            idx,
            valid,
            scale=scale,
            chunk_size=2,
            pack=pack,
            correctness=True,
        )
        assert isinstance(got, ExampleScores)
        for field, x in zip(ExampleScores._fields, got, strict=True):
            want = np.stack([np.asarray(getattr(a, field)) for a in alone])
            want[~valid] = np.nan
            np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6, err_msg=field)
        if pack:
            np.testing.assert_array_equal(got.nll, nll_only)
    assert np.isnan(got.exact[2, 3]) and np.isfinite(got.exact[valid]).all()
    kernel = jax.jit(candidate_nll, static_argnames="correctness")
    both = kernel(tiny_base, stack, scale, bank.tokens[idx], bank.loss_mask[idx], correctness=True)
    np.testing.assert_allclose(
        np.where(valid, both.accuracy, np.nan),
        np.stack([np.asarray(a.accuracy) for a in alone]) * np.where(valid, 1, np.nan),
    )
