"""LoRA trainer (JAX + optax) that builds adapter libraries, one PEFT adapter per task.

The base model stays frozen; only the LoRA factors ``{module: {"A": [L, r, d_in],
"B": [L, d_out, r]}}`` are trained, with the loss of the scoring contract (mean
negative log-likelihood of each example's target tokens and eos, averaged over the
batch). A is initialised as PEFT does (Kaiming-uniform with a=sqrt(5), i.e.
U(-1/sqrt(d_in), 1/sqrt(d_in))) and B as zeros, so training starts at the base model.

Early stopping watches the NLL on a validation slice carved from the *train* split
(never dev or test): training stops when it falls below `TrainConfig.stop_nll` or has
not improved by `min_improvement` for `patience` evaluations, and the adapter of the
best evaluation is kept. Easy tasks therefore stop after tens of steps while harder
ones use up to `max_steps`.

Resumability, for libraries that take hours to build:
  * per library: a finished adapter is a PEFT directory ``<out>/<task>/`` written
    atomically; tasks whose directory exists are skipped;
  * within an adapter: the training state (factors, optimizer state, step, best
    factors, early-stopping counters) is checkpointed with orbax under
    ``<out>/.checkpoints/<task>/`` every `checkpoint_every` steps and restored on
    restart; the batch order is a pure function of (seed, step), so a resumed run
    follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from d2c_jax.examples import EncodedExamples, encode_examples
from d2c_jax.io import finite_json
from d2c_jax.library import LoraParams, save_peft_adapter
from d2c_jax.scoring import example_nll

TRAIN_RECORD_NAME = "train_record.json"
CHECKPOINT_DIR_NAME = ".checkpoints"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How one LoRA adapter is trained.

    Attributes:
      rank: LoRA rank r.
      alpha: LoRA alpha; the adapter's scale is alpha / rank.
      target_modules: PEFT module names to adapt in every layer.
      learning_rate: peak AdamW learning rate.
      warmup_steps: linear warm-up steps before the cosine decay.
      max_steps: upper bound on optimizer steps (the cosine schedule spans it).
      batch_size: examples per step.
      weight_decay: AdamW decoupled weight decay.
      val_examples: size of the validation slice carved from the end of train.
      eval_every: steps between validation evaluations (and early-stopping checks).
      stop_nll: stop as soon as validation NLL (nats/token) falls below this.
      patience: stop after this many evaluations without `min_improvement`.
      min_improvement: relative validation-NLL improvement that resets patience.
      checkpoint_every: steps between orbax checkpoints of the training state.
      seed: seeds A's initialisation and the batch order.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    max_steps: int = 400
    batch_size: int = 8
    weight_decay: float = 0.0
    val_examples: int = 48
    eval_every: int = 25
    stop_nll: float = 0.05
    patience: int = 3
    min_improvement: float = 0.05
    checkpoint_every: int = 50
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_lora(
    key: jax.Array, module_shapes: dict[str, tuple[int, int]], num_layers: int, rank: int
) -> LoraParams:
    """PEFT's default init: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) [L, r, d_in], B = 0 [L, d_out, r]."""
    params: LoraParams = {}
    keys = jax.random.split(key, len(module_shapes))
    for module, key_m in zip(sorted(module_shapes), keys, strict=True):
        d_out, d_in = module_shapes[module]
        bound = 1.0 / math.sqrt(d_in)
        params[module] = {
            "A": jax.random.uniform(key_m, (num_layers, rank, d_in), jnp.float32, -bound, bound),
            "B": jnp.zeros((num_layers, d_out, rank), jnp.float32),
        }
    return params


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.max_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * 0.1,
    )
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Indices of the batch at `step`: epoch-wise shuffles, a pure function of (seed, step)."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[position * batch_size : (position + 1) * batch_size]


@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs; all leaves are arrays so orbax can save it."""

    lora: LoraParams
    opt_state: Any
    step: jax.Array
    best_lora: LoraParams
    best_val: jax.Array
    evals_without_improvement: jax.Array

    def as_pytree(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class LoraTrainer:
    """Trains single-task LoRA adapters on a frozen base model (see module docstring)."""

    def __init__(self, base, config: TrainConfig):
        self.base = base
        self.config = config
        self.optimizer = make_optimizer(config)
        self.module_shapes = base.module_shapes(config.target_modules)
        scale = config.scale

        # The base model is an argument of the jitted functions, never a closure: a
        # closed-over model is baked into every executable as constants (0.5 GB for
        # SmolLM2-135M per compiled shape, which grew a library build to 9 GB of RSS).
        def loss_fn(lora, base, tokens, loss_mask):
            return example_nll(base, lora, scale, tokens, loss_mask).mean()

        def train_step(base, lora, opt_state, tokens, loss_mask):
            loss, grads = jax.value_and_grad(loss_fn)(lora, base, tokens, loss_mask)
            updates, opt_state = self.optimizer.update(grads, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state, loss

        self._train_step = jax.jit(train_step, donate_argnums=(1, 2))
        self._val_nll = jax.jit(
            lambda base, lora, tokens, mask: example_nll(base, lora, scale, tokens, mask)
        )

    def initial_state(self, seed: int) -> TrainState:
        lora = init_lora(
            jax.random.key(seed), self.module_shapes, self.base.config.num_layers, self.config.rank
        )
        return TrainState(
            lora=lora,
            opt_state=self.optimizer.init(lora),
            step=jnp.asarray(0, jnp.int32),
            best_lora=jax.tree.map(jnp.copy, lora),
            best_val=jnp.asarray(jnp.inf, jnp.float32),
            evals_without_improvement=jnp.asarray(0, jnp.int32),
        )

    def validation_nll(self, lora: LoraParams, val: EncodedExamples) -> float:
        """Token-weighted mean NLL over the validation slice."""
        per_example = self._val_nll(self.base, lora, val.tokens, val.loss_mask)
        weights = val.loss_mask.sum(axis=1)
        return float((per_example * weights).sum() / weights.sum())

    def train(
        self,
        examples: Sequence[dict],
        checkpoint_dir: Path | None = None,
        description: str = "train",
    ) -> tuple[LoraParams, dict[str, Any]]:
        """Train one adapter on `examples` (the task's train split).

        Returns the best factors and a record (steps, best validation NLL, seconds,
        why it stopped). With `checkpoint_dir`, resumes from and saves to it.
        """
        cfg = self.config
        if len(examples) <= cfg.val_examples + cfg.batch_size:
            raise ValueError(
                f"{description}: {len(examples)} train examples are too few for a validation "
                f"slice of {cfg.val_examples} plus one batch of {cfg.batch_size}"
            )
        encoded = encode_examples(self.base.tokenizer, examples)
        num_train = len(examples) - cfg.val_examples
        train_tokens, train_mask = encoded.tokens[:num_train], encoded.loss_mask[:num_train]
        val = EncodedExamples(
            tokens=encoded.tokens[num_train:], loss_mask=encoded.loss_mask[num_train:]
        )

        state = self.initial_state(cfg.seed)
        manager = None
        if checkpoint_dir is not None:
            from d2c_jax.checkpoints import Checkpoints

            # Two steps: a corrupt newest one falls back to the one before it.
            manager = Checkpoints(checkpoint_dir, max_to_keep=2)
            restored = manager.restore_latest(state.as_pytree())
            if restored is not None:
                state = TrainState(**restored[1])

        start = time.perf_counter()
        step = resumed_from = int(state.step)
        stop_reason = "max_steps"
        last_loss = float("nan")
        bar = tqdm(total=cfg.max_steps, initial=step, desc=description, leave=False)
        lora, opt_state = state.lora, state.opt_state
        best_lora, best_val = state.best_lora, float(state.best_val)
        stale = int(state.evals_without_improvement)
        while step < cfg.max_steps:
            idx = batch_indices(cfg.seed, step, num_train, cfg.batch_size)
            lora, opt_state, loss = self._train_step(
                self.base, lora, opt_state, train_tokens[idx], train_mask[idx]
            )
            step += 1
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                last_loss = float(loss)
                val_nll = self.validation_nll(lora, val)
                if val_nll < best_val * (1 - cfg.min_improvement):
                    stale = 0
                else:
                    stale += 1
                if val_nll < best_val:
                    best_val, best_lora = val_nll, jax.tree.map(jnp.copy, lora)
                bar.set_postfix(loss=f"{last_loss:.3f}", val=f"{val_nll:.3f}")
                if best_val < cfg.stop_nll:
                    stop_reason = "stop_nll"
                    break
                if stale >= cfg.patience:
                    stop_reason = "patience"
                    break
            if manager is not None and step % cfg.checkpoint_every == 0:
                self._save(manager, step, lora, opt_state, best_lora, best_val, stale)
        bar.close()
        if manager is not None:
            manager.close()  # joins orbax's background threads; one manager per adapter
        record = {
            "steps": step,
            "stop_reason": stop_reason,
            "best_val_nll": best_val,
            "last_train_loss": last_loss,
            "seconds_this_run": time.perf_counter() - start,
            # Wall time is not checkpointed: a resumed adapter's seconds cover this run.
            "resumed_from_step": resumed_from,
            "num_train": num_train,
            "num_val": cfg.val_examples,
        }
        return best_lora, record

    @staticmethod
    def _save(manager, step, lora, opt_state, best_lora, best_val, stale) -> None:
        state = TrainState(
            lora=lora,
            opt_state=opt_state,
            step=jnp.asarray(step, jnp.int32),
            best_lora=best_lora,
            best_val=jnp.asarray(best_val, jnp.float32),
            evals_without_improvement=jnp.asarray(stale, jnp.int32),
        )
        manager.save(step, state.as_pytree())


def train_library(
    base,
    tasks: dict[str, Sequence[dict]],
    out_dir: str | Path,
    config: TrainConfig,
    base_model_name: str | None,
    dtype=jnp.bfloat16,
) -> dict[str, dict[str, Any]]:
    """Train one adapter per task, in the order given, into ``<out_dir>/<task>/``.

    Resumable (see module docstring).

    Returns ``{task: train record}`` for every task (including ones finished earlier).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = LoraTrainer(base, config)
    records: dict[str, dict[str, Any]] = {}
    for i, (task, examples) in enumerate(tasks.items()):
        adapter_dir = out_dir / task
        if (adapter_dir / TRAIN_RECORD_NAME).is_file():
            records[task] = json.loads((adapter_dir / TRAIN_RECORD_NAME).read_text())
            continue
        checkpoint_dir = out_dir / CHECKPOINT_DIR_NAME / task
        start = time.perf_counter()
        lora, record = trainer.train(
            examples, checkpoint_dir=checkpoint_dir, description=f"[{i + 1}/{len(tasks)}] {task}"
        )
        record.update(task=task, seed=config.seed, config=dataclasses.asdict(config))
        record["seconds"] = time.perf_counter() - start
        save_peft_adapter(
            adapter_dir,
            lora,
            rank=config.rank,
            alpha=config.alpha,
            base_model=base_model_name,
            dtype=dtype,
            provenance={"task": task, "train_record": TRAIN_RECORD_NAME},
            overwrite=True,
        )
        # The record marks the adapter as finished; it is written last.
        tmp = adapter_dir / f".{TRAIN_RECORD_NAME}.tmp"
        tmp.write_text(json.dumps(finite_json(record), indent=2, allow_nan=False) + "\n")
        tmp.replace(adapter_dir / TRAIN_RECORD_NAME)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        records[task] = record
        tqdm.write(
            f"{task}: {record['steps']} steps, val NLL {record['best_val_nll']:.4f} "
            f"({record['stop_reason']}), {record['seconds']:.0f} s"
        )
    shutil.rmtree(out_dir / CHECKPOINT_DIR_NAME, ignore_errors=True)
    return records
