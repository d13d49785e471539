"""DevObjective on tiny random models: batched scoring equals one-at-a-time and an
independent merge-then-score reference; and D2C beats K-Means on a planted library."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2c_jax import merging
from d2c_jax.cluster import D2CClustering, KMeansClustering, membership_mask
from d2c_jax.cluster.objective import SIMILAR_WORK, DevObjective, ObjectiveConfig
from d2c_jax.examples import encode_examples
from d2c_jax.generation import generate
from d2c_jax.library import AdapterLibrary
from d2c_jax.models import BaseModel, Decoder
from d2c_jax.scoring import example_nll
from kernels.merge import MergeConfig

TIES = MergeConfig(method="ties", space="delta", density=0.5)


def library_from(params, names, scale=1.0, base_model="tiny-llama"):
    n = len(names)
    rank = next(iter(params.values()))["A"].shape[2]
    return AdapterLibrary(
        names=tuple(names),
        params={m: {f: jnp.asarray(x) for f, x in fs.items()} for m, fs in params.items()},
        scale=jnp.full((n,), scale, jnp.float32),
        rank=rank,
        ranks=(rank,) * n,
        target_modules=tuple(sorted(params)),
        base_model=base_model,
    )


def task_examples(names, seed=0, per_task=3):
    rng = np.random.default_rng(seed)
    words = ["cat", "dog", "sun", "sky", "tree", "jax", "hello", "lora"]
    return {
        name: [
            {"prompt": f"{name}: {rng.choice(words)}", "target": str(rng.choice(words))}
            for _ in range(per_task)
        ]
        for name in names
    }


@pytest.fixture
def small_problem(tiny_base, make_lora):
    names = [f"t{i}" for i in range(5)]
    library = library_from(make_lora(tiny_base.config, n=5, seed=3), names, scale=2.0)
    return library, task_examples(names)


@pytest.mark.parametrize(
    "score_deployed, candidates_per_call",
    [(False, 3), (True, 3), (False, 8)],  # chunks of 3 + 2 rows, or 5 rows computed as 6
)
def test_batched_equals_one_at_a_time_and_reference(
    tiny_base, small_problem, score_deployed, candidates_per_call
):
    library, examples = small_problem
    masks = np.array(
        [[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]],
        bool,
    )
    objective = DevObjective(
        tiny_base,
        library,
        examples,
        TIES,
        ObjectiveConfig(score_deployed=score_deployed, candidates_per_call=candidates_per_call),
    )
    assert [objective._chunk_size(c) for c in range(1, 9)] == [
        min(candidates_per_call, size) for size in (1, 2, 3, 4, 6, 6, 8, 8)
    ]
    # Calls group candidates of similar work, so small sets are not computed at the
    # size of the largest: every row once, at most candidates_per_call per call.
    chunks = objective._chunks(masks)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(masks)))
    work = masks @ objective.task_tokens
    for rows in chunks:
        assert len(rows) <= candidates_per_call
        assert work[rows].min() >= SIMILAR_WORK * work[rows].max()
    batched = objective.task_losses(masks)
    alone = np.concatenate([objective.task_losses(m[None]) for m in masks])
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-6)
    assert (batched[~masks] == 0).all() and (batched[masks] > 0).all()

    # Independent reference: merge each row alone, score each member task with the
    # single-adapter loss function.
    for c, mask in enumerate(masks):
        merged = merging.merge(
            library.params,
            library.scale,
            jnp.asarray(mask[None], jnp.float32),
            TIES,
            names=library.names,
            return_delta=True,
        )
        if score_deployed:
            adapter = jax.tree.map(lambda x: x[0], merged.params)
        else:
            adapter = jax.tree.map(lambda x: x[0], merged.delta)
        for t in np.flatnonzero(mask):
            enc = encode_examples(tiny_base, examples[library.names[t]], task_key=None)
            nll = example_nll(tiny_base, adapter, 1.0, enc.tokens, enc.loss_mask)
            assert batched[c, t] == pytest.approx(float(nll.mean()), rel=1e-5, abs=1e-6)


def test_with_examples_scores_other_examples_on_the_same_merges(tiny_base, small_problem):
    library, examples = small_problem
    held_out = task_examples(library.names, seed=7, per_task=2)
    masks = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    objective = DevObjective(tiny_base, library, examples, TIES)
    before = objective.task_losses(masks)
    other = objective.with_examples(held_out)
    assert other.prepared is objective.prepared  # no second copy of the library
    expected = DevObjective(tiny_base, library, held_out, TIES).task_losses(masks)
    np.testing.assert_allclose(other.task_losses(masks), expected, rtol=1e-6)
    assert not np.allclose(expected[masks], before[masks])
    np.testing.assert_array_equal(objective.task_losses(masks), before)  # unchanged
    with pytest.raises(ValueError, match="no dev examples"):
        objective.with_examples({"t0": held_out["t0"]})


def test_examples_must_cover_the_library(tiny_base, small_problem):
    library, examples = small_problem
    partial = {k: v for k, v in examples.items() if k != "t3"}
    with pytest.raises(ValueError, match=r"no dev examples for tasks \['t3'\]"):
        DevObjective(tiny_base, library, partial, TIES)
    extra = {**examples, "other": examples["t0"]}
    with pytest.raises(ValueError, match=r"tasks not in the library: \['other'\]"):
        DevObjective(tiny_base, library, extra, TIES)


def planted_problem(tiny_base):
    """A library where parameter similarity and data disagree.

    The base model's o_proj ignores attention heads 0-1, which read KV head 0, so
    v_proj output rows 0..15 (KV head 0) cannot change the model's outputs. Each
    adapter has a visible part on v_proj rows 16..31: tasks a0, a1 share direction
    U, tasks b0, b1 share direction V, and each task's dev targets are what the
    model with its own adapter generates. Adapters a1 and b1 also carry the same
    large *invisible* component W on rows 0..15. Parameter distance is dominated
    by W, so K-Means pairs {a0, b0} and {a1, b1}; the data say {a0, a1} and
    {b0, b1}, which only a data-driven method can see.
    """
    config = tiny_base.config
    weights = jax.tree.map(np.array, tiny_base.model.weights())
    head = config.head_dim
    weights["layers"]["o_proj"][:, :, : 2 * head] = 0.0  # heads 0,1 -> KV head 0 invisible
    base = BaseModel(
        Decoder(config, weights), tiny_base.tokenizer, name="tiny-llama", source="tiny"
    )
    rng = np.random.default_rng(0)
    layers, rank, d_in = config.num_layers, 4, config.hidden_size
    visible = slice(head, 2 * head)
    invisible = slice(0, head)
    a = rng.normal(size=(layers, rank, d_in)).astype(np.float32) / np.sqrt(d_in)
    direction = {k: 3.0 * rng.normal(size=(layers, head, rank)).astype(np.float32) for k in "UV"}
    big = 30.0 * rng.normal(size=(layers, head, rank)).astype(np.float32)
    params_a, params_b = [], []
    for vis, with_w in (("U", False), ("U", True), ("V", False), ("V", True)):
        b = np.zeros((layers, config.num_kv_heads * head, rank), np.float32)
        b[:, visible] = direction[vis]
        if with_w:
            b[:, invisible] = big
        params_a.append(a)
        params_b.append(b)
    names = ["a0", "a1", "b0", "b1"]
    library = library_from({"v_proj": {"A": np.stack(params_a), "B": np.stack(params_b)}}, names)
    prompts = [f"say {w}" for w in ["cat", "dog", "sun", "sky", "tree", "lora"]]
    examples = {}
    for i, name in enumerate(names):
        targets = generate(base, library.adapter(i), prompts, max_new_tokens=6, chat_template=False)
        examples[name] = [
            {"prompt": p, "target": t} for p, t in zip(prompts, targets, strict=True) if t.strip()
        ]
    return base, library, examples


def test_d2c_beats_kmeans_on_planted_library(tiny_base):
    base, library, examples = planted_problem(tiny_base)
    merge = MergeConfig(method="linear", space="delta")
    objective = DevObjective(base, library, examples, merge)

    kmeans = KMeansClustering().fit(library, 2, seed=0)
    by_parameters = np.array([0, 1, 0, 1])
    assert (kmeans.assign == by_parameters).all() or (kmeans.assign == 1 - by_parameters).all()

    d2c = D2CClustering(init="kmeans", mode="best", max_iters=50, task_loss="nll").fit(
        library, 2, seed=0, objective=objective, progress=False
    )
    kmeans_j = objective.task_losses(membership_mask(kmeans.assign, 2)).sum() / 4
    assert d2c.info["initial_objective"] == pytest.approx(kmeans_j, rel=1e-6)
    objectives = [entry["objective"] for entry in d2c.log]
    assert all(b <= a for a, b in zip(objectives, objectives[1:], strict=False))
    assert d2c.objective < kmeans_j - 0.05
    by_data = np.array([0, 0, 1, 1])
    assert (d2c.assign == by_data).all() or (d2c.assign == 1 - by_data).all()


def test_task_scores_are_per_task_means_of_the_same_pass(tiny_base, small_problem):
    """`task_scores`: the NLL row is `task_losses`; every other row is the mean over a
    member task's examples of the single-adapter `ExampleScores` under the merge."""
    from d2c_jax.cluster.d2c import TASK_SCORES

    library, examples = small_problem
    masks = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    objective = DevObjective(
        tiny_base, library, examples, TIES, ObjectiveConfig(candidates_per_call=2)
    )
    scores = objective.task_scores(masks)
    assert scores.shape == (3, len(TASK_SCORES), 5)
    np.testing.assert_allclose(
        scores[:, TASK_SCORES.index("nll")], objective.task_losses(masks), rtol=1e-6
    )
    assert (scores[:, :, ~masks[0]][0] == 0).all()
    one = jax.jit(example_nll, static_argnames="correctness")
    for c, mask in enumerate(masks):
        merged = merging.merge(
            library.params,
            library.scale,
            jnp.asarray(mask[None], jnp.float32),
            TIES,
            names=library.names,
            return_delta=True,
        )
        adapter = jax.tree.map(lambda x: x[0], merged.delta)
        for t in np.flatnonzero(mask):
            enc = encode_examples(tiny_base, examples[library.names[t]], task_key=None)
            want = one(tiny_base, adapter, 1.0, enc.tokens, enc.loss_mask, correctness=True)
            for f, name in enumerate(TASK_SCORES):
                assert scores[c, f, t] == pytest.approx(
                    float(np.mean(getattr(want, name))), rel=1e-4, abs=1e-5
                ), name


@pytest.mark.parametrize("task_loss", ["exact", "margin"])
def test_d2c_with_teacher_forced_losses_on_planted_library(tiny_base, tiny_examples, task_loss):
    """The correctness losses drive the same search (scores cached per member set, the
    NLL cache filled from the same pass, the state round-trips) and find the data's
    grouping of the planted library."""
    from d2c_jax.cluster.d2c import TASK_LOSSES, TASK_SCORES, CachedObjective

    if task_loss == "exact":  # within a task, one more exact example beats any likelihood
        f = TASK_LOSSES["exact"].fn
        better = f({"exact": np.array([0.5]), "nll": np.array([15.0])})
        assert better < f({"exact": np.array([0.4]), "nll": np.array([0.0])})
    base, library, examples = planted_problem(tiny_base)
    objective = DevObjective(base, library, examples, MergeConfig(method="linear", space="delta"))
    cached = CachedObjective(objective)
    # No dev example is exact here (targets are cut before the eos) and every NLL is near
    # 4.8, so only the tie-break moves J, by about 1e-5: under the default tol.
    tol = 0.0 if task_loss == "exact" else D2CClustering.tol
    d2c = D2CClustering(init="kmeans", mode="best", max_iters=50, task_loss=task_loss, tol=tol).fit(
        library, 2, seed=0, objective=cached, progress=False
    )
    objectives = [entry["objective"] for entry in d2c.log]
    assert all(b <= a for a, b in zip(objectives, objectives[1:], strict=False))
    by_data = np.array([0, 0, 1, 1])
    assert (d2c.assign == by_data).all() or (d2c.assign == 1 - by_data).all()
    masks = membership_mask(d2c.assign, 2)
    stats = objective.task_scores(masks)
    want = (
        sum(
            np.where(m, TASK_LOSSES[task_loss].fn(dict(zip(TASK_SCORES, s, strict=True))), 0).sum()
            for m, s in zip(masks, stats, strict=True)
        )
        / 4
    )
    assert d2c.objective == pytest.approx(want, rel=1e-5)
    assert set(cached.scores) <= set(cached.cache)  # the NLL came with the scores
    state = cached.state()
    again = CachedObjective(objective)
    again.load_state(state)
    before = objective.evaluations
    assert again.cluster_losses(masks, task_loss).sum() / 4 == pytest.approx(d2c.objective)
    assert objective.evaluations == before  # served from the restored cache
