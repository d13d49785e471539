"""LoRA trainer on a tiny random model: it learns, writes PEFT adapters, and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from d2c_jax.examples import encode_examples
from d2c_jax.library import AdapterLibrary
from d2c_jax.scoring import example_nll
from d2c_jax.train import LoraTrainer, TrainConfig, batch_indices, init_lora, train_library

CONFIG = TrainConfig(
    rank=4,
    alpha=8,
    max_steps=40,
    batch_size=4,
    val_examples=8,
    eval_every=10,
    warmup_steps=5,
    learning_rate=1e-2,
    checkpoint_every=5,
    stop_nll=0.0,
    patience=100,
)


def copy_task(n=40, seed=0):
    """Targets repeat the prompt's word: learnable by a tiny model in tens of steps."""
    rng = np.random.default_rng(seed)
    words = ["ab", "cd", "ef", "gh", "ij", "kl"]
    return [{"prompt": f"copy {w}:", "target": w} for w in rng.choice(words, size=n).tolist()]


def test_init_matches_peft_defaults(tiny_base):
    lora = init_lora(jax.random.key(0), tiny_base.module_shapes(("q_proj",)), 2, rank=4)
    a, b = np.asarray(lora["q_proj"]["A"]), np.asarray(lora["q_proj"]["B"])
    assert a.shape == (2, 4, 64) and b.shape == (2, 64, 4)
    assert (b == 0).all()
    assert np.abs(a).max() <= 1 / np.sqrt(64) and np.abs(a).max() > 0.5 / np.sqrt(64)


def test_batches_are_a_pure_function_of_seed_and_step():
    first = [batch_indices(0, s, 20, 4).tolist() for s in range(10)]
    assert first == [batch_indices(0, s, 20, 4).tolist() for s in range(10)]
    assert sorted(sum(first[:5], [])) == list(range(20))  # one epoch covers every example
    assert first != [batch_indices(1, s, 20, 4).tolist() for s in range(10)]


def test_training_lowers_loss_and_writes_a_loadable_library(tiny_base, tmp_path):
    examples = copy_task()
    enc = encode_examples(tiny_base, examples)
    records = train_library(
        tiny_base, {"copy": examples}, tmp_path / "lib", CONFIG, base_model_name="tiny-llama"
    )
    assert records["copy"]["steps"] == 40
    library = AdapterLibrary.load(tmp_path / "lib")
    assert library.names == ("copy",) and library.base_model == "tiny-llama"
    params, scale = library.adapter(0)
    assert scale == pytest.approx(CONFIG.alpha / CONFIG.rank)
    before = float(example_nll(tiny_base, None, 1.0, enc.tokens, enc.loss_mask).mean())
    after = float(example_nll(tiny_base, params, scale, enc.tokens, enc.loss_mask).mean())
    assert after < 0.7 * before
    # resuming a finished library trains nothing and returns the stored record
    again = train_library(
        tiny_base, {"copy": examples}, tmp_path / "lib", CONFIG, base_model_name="tiny-llama"
    )
    assert again["copy"] == json.loads((tmp_path / "lib/copy/train_record.json").read_text())


def test_early_stopping_keeps_the_best_adapter(tiny_base):
    config = TrainConfig(**{**CONFIG.__dict__, "stop_nll": 10.0})
    lora, record = LoraTrainer(tiny_base, config).train(copy_task())
    assert record["stop_reason"] == "stop_nll" and record["steps"] == config.eval_every


def test_too_few_examples_is_a_clear_error(tiny_base):
    with pytest.raises(ValueError, match="too few"):
        LoraTrainer(tiny_base, CONFIG).train(copy_task(n=10))


def _train_cmd(hf_dir, tasks_dir, out):
    return [
        sys.executable,
        "-m",
        "d2c_jax.cli",
        "train",
        "--base",
        str(hf_dir),
        "--tasks",
        str(tasks_dir),
        "--out",
        str(out),
        "--rank",
        "4",
        "--alpha",
        "8",
        "--max-steps",
        "100",
        "--checkpoint-every",
        "5",
        "--batch-size",
        "4",
        "--eval-every",
        "10",
        "--stop-nll",
        "0",
        "--patience",
        "100",
        "--learning-rate",
        "1e-2",
        "--warmup-steps",
        "5",
    ]


def test_killed_training_resumes_to_the_same_adapter(tiny_hf_dir, tmp_path):
    tasks_dir = tmp_path / "tasks"
    for name, seed in (("copy_a", 0), ("copy_b", 1)):
        (tasks_dir / name).mkdir(parents=True)
        lines = [json.dumps(e) for e in copy_task(n=70, seed=seed)]
        (tasks_dir / name / "train.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(
        _train_cmd(tiny_hf_dir, tasks_dir, tmp_path / "full"),
        check=True,
        env=env,
        capture_output=True,
    )
    proc = subprocess.Popen(
        _train_cmd(tiny_hf_dir, tasks_dir, tmp_path / "killed"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = tmp_path / "killed" / ".checkpoints" / "copy_b"
    deadline = time.time() + 300

    # orbax writes into a temporary directory and renames it to the bare step when done;
    # the first one lands at step 5 of 100, so the kill falls mid-adapter
    def finalized():
        return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())

    while time.time() < deadline and not finalized():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "killed" / "copy_a" / "train_record.json").is_file()
    assert not (tmp_path / "killed" / "copy_b").exists()
    subprocess.run(
        _train_cmd(tiny_hf_dir, tasks_dir, tmp_path / "killed"),
        check=True,
        env=env,
        capture_output=True,
    )
    record = lambda run, task: json.loads((tmp_path / run / task / "train_record.json").read_text())
    assert record("full", "copy_b")["resumed_from_step"] == 0
    assert record("killed", "copy_b")["resumed_from_step"] % 5 == 0
    assert record("killed", "copy_b")["resumed_from_step"] > 0
    full = AdapterLibrary.load(tmp_path / "full")
    resumed = AdapterLibrary.load(tmp_path / "killed")
    assert full.names == resumed.names == ("copy_a", "copy_b")
    for module in full.target_modules:
        for factor in "AB":
            np.testing.assert_allclose(
                resumed.params[module][factor], full.params[module][factor], rtol=1e-2, atol=1e-3
            )


def test_a_bad_checkpoint_falls_back_to_the_one_before_or_is_refused(tiny_base, tmp_path):
    import dataclasses

    from d2c_jax.checkpoints import CheckpointError, CheckpointWarning
    from tests.test_cluster_d2c import garble_data, kill_during_save

    config = dataclasses.replace(CONFIG, max_steps=10, eval_every=5)
    trainer = LoraTrainer(tiny_base, config)
    examples, checkpoints = copy_task(), tmp_path / "ckpt"
    full, _ = trainer.train(examples, checkpoint_dir=checkpoints)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["10", "5"]
    garble_data(checkpoints / "10")
    kill_during_save(checkpoints, 15)
    with pytest.warns(CheckpointWarning, match="skipped checkpoint step 10 .*resuming from step 5"):
        resumed, record = trainer.train(examples, checkpoint_dir=checkpoints)
    assert record["resumed_from_step"] == 5
    for module in full:
        for factor in "AB":
            np.testing.assert_allclose(
                resumed[module][factor], full[module][factor], rtol=1e-5, atol=1e-6
            )
    for step in ("5", "10"):
        garble_data(checkpoints / step)
    with pytest.raises(CheckpointError, match="delete the step directories 5, 10 there"):
        trainer.train(examples, checkpoint_dir=checkpoints)
