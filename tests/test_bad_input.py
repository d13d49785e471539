# ruff: noqa: E501  (the corpus keeps one case per line)
"""Bad input never hurts: a corpus of bad or unusual `d2c` invocations.

Every case of `CASES` runs `d2c_jax.cli.main` in-process on a tiny model, library,
example files and previous outputs under one directory, and asserts: a non-zero
exit, exactly one ``error:`` line on stderr naming the file or argument (the case's
expected text), no traceback, nothing created in or beside OUT, and every input
unchanged (paths, modes and content hashes of the whole tree before and after).

Below the corpus: recovery (a failed cluster run cleans up, killed runs resume to the
files of an uninterrupted one, --force replaces only its own output and restores it
on failure), the one "same base model" rule, and the friendly-CLI checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from d2c_jax.cli import main
from d2c_jax.models.families import FAMILIES, GGUF_ARCHS
from tests.conftest import save_random_library

TASKS = ("t0", "t1", "t2", "t3")


# --------------------------------------------------------------------- fixtures


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_hf_dir, tiny_config):
    """Everything a case may read: base, library, examples, task suite, outputs."""
    root = tmp_path_factory.mktemp("bad_input")
    shutil.copytree(tiny_hf_dir, root / "base")
    save_random_library(root / "library", tiny_config, TASKS, seed=3, std=0.2)
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sun", "sky", "tree"]
    for task in TASKS:
        for split, n in (("dev", 3), ("test", 3), ("train", 8)):
            rows = [
                {"prompt": f"{task} {rng.choice(words)}", "target": str(rng.choice(words))}
                for _ in range(n)
            ]
            _write_jsonl(root / "examples" / task / f"{split}.jsonl", rows)
    _write_jsonl(root / "score.jsonl", [{"prompt": "a", "target": "b"}] * 2)
    # Previous outputs of merge and cluster, for --force cases.
    adapters = [str(root / "library" / t) for t in TASKS]
    merge = ["merge", "--adapters", *adapters, "--method", "linear", "--out"]
    assert main([*merge, str(root / "merged")]) == 0
    assert main(cluster_args(root, root / "clustered", "--method", "random")) == 0
    (root / "plain.txt").write_text("not an output\n")
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("keep me\n")
    (root / "foreign.json").write_text('{"something": "else"}\n')
    return root


def cluster_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "cluster",
        "--base",
        str(root / "base"),
        "--library",
        str(root / "library"),
        "--examples",
        str(root / "examples"),
        "--budget",
        "2",
        "--merge",
        "ties",
        "--density",
        "0.5",
        "--seed",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def tree_state(root: Path) -> dict[str, tuple]:
    """{relative path: (mode, sha256 or 'dir')} of everything under root."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():  # a bad library may hold a dangling one
            state[rel] = (mode, f"-> {path.readlink()}")
        elif path.is_dir():
            state[rel] = (mode, "dir")
        else:
            state[rel] = (mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------- corpus
# (id, argv with {R} = the world root, expected text of the error line, setup or None)
# A setup gets the root and returns nothing; it runs before the "before" snapshot.


def _bad_utf8(path: str):
    def setup(root: Path) -> None:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(
            b'{"prompt": "a", "target": "b"}\n{"prompt": "\xff\xfe", "target": "x"}\n'
        )

    return setup


def _write(path: str, text: str):
    def setup(root: Path) -> None:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    return setup


def _copy_base(name: str, *, config: dict | None = None, drop: str | None = None):
    def setup(root: Path) -> None:
        target = root / name
        if target.exists():
            return
        shutil.copytree(root / "base", target)
        if config is not None:
            data = json.loads((target / "config.json").read_text())
            data.update(config)
            (target / "config.json").write_text(json.dumps(data))
        if drop:
            (target / drop).unlink()

    return setup


def _nan_adapter(root: Path) -> None:
    from safetensors.numpy import load_file, save_file

    target = root / "nan_adapter"
    if target.exists():
        return
    shutil.copytree(root / "library" / "t0", target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan
    save_file(tensors, str(target / "adapter_model.safetensors"))


def _corrupt_settings(root: Path) -> None:
    out = root / "half_run"
    (out / ".search").mkdir(parents=True, exist_ok=True)
    (out / ".search" / "settings.json").write_text("{not json")


def _library_for_path(root: Path) -> None:
    """lib_by_path/: the library, recording the world's base by its path (as `d2c
    train --base DIR` records a directory without a hub name)."""
    target = root / "lib_by_path"
    if target.exists():
        return
    shutil.copytree(root / "library", target)
    for config_path in target.glob("*/adapter_config.json"):
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(root / "base")
        config_path.write_text(json.dumps(config))


def _base_weights(root: Path, shift: float):
    from d2c_jax.models.hf import load_hf_weights

    config, weights = load_hf_weights(root / "base")
    weights["embed"] = np.asarray(weights["embed"]) + shift
    return config, weights


def _other_model(name: str, *, shift: float = 0.5, hub_name: str = "tiny-llama"):
    """An HF base at `name`: the world's base with shifted embeddings (shift 0: the same
    weights) under the hub name `hub_name`."""

    def setup(root: Path) -> None:
        from d2c_jax.models.hf import save_hf_weights

        target = root / name
        if target.exists():
            return
        shutil.copytree(root / "base", target)
        config, weights = _base_weights(root, shift)
        for path in target.glob("*.safetensors"):
            path.unlink()
        save_hf_weights(target, config, weights, extra_config={"_name_or_path": hub_name})

    return setup


def _gguf_base(name: str, *, shift: float):
    """A llama.cpp GGUF of the world's base (embeddings shifted by `shift`)."""

    def setup(root: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        from tests.conftest import write_tiny_gguf

        target = root / name
        if target.exists():
            return
        config, weights = _base_weights(root, shift)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(root / "base"))
        write_tiny_gguf(target, config, weights, tokenizer)

    return setup


def _each(*setups):
    def setup(root: Path) -> None:
        for one in setups:
            one(root)

    return setup


_OTHER_MODEL = _each(_library_for_path, _other_model("other/base"))


def _with_notes(previous: str, name: str):
    """`name`: a copy of the previous output `previous` holding a user's notes.txt."""

    def setup(root: Path) -> None:
        target = root / name
        if not target.exists():
            shutil.copytree(root / previous, target)
            (target / "notes.txt").write_text("my notes\n")

    return setup


def _library_copy(name: str, change):
    """{R}/<name>: a copy of the library, then `change(copy)` makes it bad."""

    def setup(root: Path) -> None:
        target = root / name
        if not target.exists():
            shutil.copytree(root / "library", target)
            change(target)

    return setup


def _untargeted(library: Path) -> None:
    config_path = library / "t0" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"target_modules": ["q_proj"]}))


def _language_model_keys(library: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path = library / "t1" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    prefix, multimodal = "base_model.model.model.", "base_model.model.model.language_model."
    save_file({k.replace(prefix, multimodal, 1): v for k, v in tensors.items()}, str(path))


def _bert_gguf(root: Path) -> None:
    """bert.gguf: a GGUF whose general.architecture is one llama.cpp has and we do not."""
    import gguf

    target = root / "bert.gguf"
    if target.exists():
        return
    writer = gguf.GGUFWriter(str(target), "bert")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# An unsupported base is refused from its config alone, before any other input is read:
# every other input of these cases is missing, and the message is still about the base.
_BERT = _copy_base("base_bert", config={"model_type": "bert"})
BERT_MESSAGE = (
    f"{{R}}/base_bert/config.json: model_type 'bert' is not supported "
    f"({', '.join(sorted(FAMILIES))})"
)
BERT_GGUF_MESSAGE = (
    f"{{R}}/bert.gguf: GGUF architecture 'bert' is not supported ({', '.join(sorted(GGUF_ARCHS))})"
)
UNSUPPORTED_BASE_CASES = [
    ("score-base-unsupported", ["score", "--base", "{R}/base_bert", "--examples", "{R}/nope.jsonl", "--adapter", "{R}/nope"], BERT_MESSAGE, _BERT),
    ("generate-base-unsupported", ["generate", "--base", "{R}/base_bert", "--prompt", "hi", "--adapter", "{R}/nope"], BERT_MESSAGE, _BERT),
    ("train-base-unsupported", ["train", "--base", "{R}/base_bert", "--tasks", "{R}/nope", "--out", "{R}/tr"], BERT_MESSAGE, _BERT),
    ("cluster-d2c-base-unsupported", ["cluster", "--method", "d2c", "--base", "{R}/base_bert", "--library", "{R}/nope", "--tasks", "{R}/nope", "--budget", "2", "--out", "{R}/cl_bert"], BERT_MESSAGE, _BERT),
    ("cluster-kmeans-tasks-base-unsupported", ["cluster", "--method", "kmeans", "--base", "{R}/base_bert", "--library", "{R}/nope", "--tasks", "{R}/nope", "--budget", "2", "--out", "{R}/cl_bert"], BERT_MESSAGE, _BERT),
    ("evaluate-base-unsupported", ["evaluate", "--base", "{R}/base_bert", "--assignment", "{R}/nope", "--library", "{R}/nope", "--tasks", "{R}/nope", "--out", "{R}/e.json"], BERT_MESSAGE, _BERT),
    ("export-base-unsupported", ["export", "--clusters", "{R}/nope", "--base", "{R}/bert.gguf", "--out", "{R}/ex"], BERT_GGUF_MESSAGE, _bert_gguf),
    ("export-base-unsupported-hf", ["export", "--clusters", "{R}/nope", "--base", "{R}/base_bert", "--out", "{R}/ex"], BERT_MESSAGE, _BERT),
]  # fmt: skip

LIB = ["--adapters", "{R}/library"]
MERGE = ["merge", *LIB, "--method", "ties", "--density", "0.5"]
SCORE = ["score", "--base", "{R}/base", "--examples", "{R}/score.jsonl"]
GEN = ["generate", "--base", "{R}/base", "--prompt", "hi"]
TRAIN = ["train", "--base", "{R}/base", "--tasks", "{R}/examples", "--max-steps", "1"]
EVAL = ["evaluate", "--base", "{R}/base", "--library", "{R}/library", "--tasks", "{R}/examples"]
EVAL_DIR = [*EVAL, "--assignment", "{R}/clustered"]
CLUSTER = cluster_args(Path("{R}"), Path("{R}/cl_out"), "--method", "random")


def _with(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv with `flag`'s value replaced (or the flag added)."""
    argv = list(argv)
    if flag in argv:
        i = argv.index(flag)
        if value is None:
            del argv[i : i + 2]
        else:
            argv[i + 1] = value
    elif value is not None:
        argv += [flag, value]
    return argv


# A D2C search of many small iterations (one move each), stopped after two saves.
D2C = [
    *_with(CLUSTER, "--method", "d2c"),
    "--mode",
    "best",
    "--max-iters",
    "50",
    "--task-loss",
    "nll",
]


def _stop_d2c_run(root: Path, out: Path) -> None:
    """Run D2C into `out` and interrupt it right after its second checkpoint (steps 0
    and 1 kept), as a kill between two saves leaves it."""
    import contextlib
    import io

    from d2c_jax.cluster import d2c

    save, saves = d2c._SearchCheckpoint.save, []

    def save_then_stop(self, *args, **kwargs):
        save(self, *args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    d2c._SearchCheckpoint.save = save_then_stop
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its progress and "interrupted"
            assert main(_fill(_with(D2C, "--out", str(out)), root)) == 130
    finally:
        d2c._SearchCheckpoint.save = save
    steps = sorted(p.name for p in (out / ".search" / "ckpt").iterdir())
    assert steps == ["0", "1"], steps


def _stopped_template(root: Path) -> Path:
    template = root / "d2c_stopped"
    if not template.exists():
        _stop_d2c_run(root, template)
    return template


def _stopped_d2c(name: str, damage=None):
    """{R}/<name>: the stopped D2C run, then `damage(its checkpoint directory)`."""

    def setup(root: Path) -> None:
        target = root / name
        if target.exists():
            return
        shutil.copytree(_stopped_template(root), target)
        if damage is not None:
            damage(target / ".search" / "ckpt")

    return setup


def _garble_every_step(checkpoints: Path) -> None:
    from tests.test_cluster_d2c import garble_data, kill_during_save

    for step in ("0", "1"):
        garble_data(checkpoints / step)
    kill_during_save(checkpoints, 2)


def _without(name: str, path: str):
    """{R}/<name>: the task suite without `path` (``t3/dev.jsonl``)."""

    def setup(root: Path) -> None:
        target = root / name
        if not target.exists():
            shutil.copytree(root / "examples", target)
            (target / path).unlink()

    return setup


CASES = [
    # ---- merge: never destroy input
    ("merge-out-is-library-force", [*MERGE, "--out", "{R}/library", "--force"], "is the input --adapters", None),
    ("merge-out-is-library", [*MERGE, "--out", "{R}/library"], "is the input --adapters", None),
    ("merge-out-inside-library", [*MERGE, "--out", "{R}/library/t0/m", "--force"], "is inside the input --adapters", None),
    ("merge-out-contains-library", [*MERGE, "--out", "{R}", "--force"], "contains the input --adapters", None),
    ("merge-out-is-one-adapter", ["merge", "--adapters", "{R}/library/t0", "{R}/library/t1", "--method", "linear", "--out", "{R}/library/t1", "--force"], "is the input --adapters", None),
    ("merge-out-foreign-dir-force", [*MERGE, "--out", "{R}/notes", "--force"], "not a previous output of `d2c merge`", None),
    ("merge-out-previous-no-force", [*MERGE, "--out", "{R}/merged"], "pass --force", None),
    ("merge-out-existing-file", [*MERGE, "--out", "{R}/plain.txt"], "is an existing file", None),
    ("merge-out-existing-file-force", [*MERGE, "--out", "{R}/plain.txt", "--force"], "is an existing file", None),
    ("merge-out-below-file", [*MERGE, "--out", "{R}/plain.txt/merged"], "is a file, not a directory", None),
    ("merge-out-unwritable", [*MERGE, "--out", "/proc/d2c-test-out"], "cannot write in /proc", None),
    # ---- merge: arguments
    ("merge-density-0", _with(MERGE, "--density", "0") + ["--out", "{R}/m"], "argument --density: must be in (0, 1]", None),
    ("merge-density-negative", _with(MERGE, "--density", "-0.1") + ["--out", "{R}/m"], "argument --density", None),
    ("merge-density-above-1", _with(MERGE, "--density", "1.5") + ["--out", "{R}/m"], "argument --density", None),
    ("merge-density-nan", _with(MERGE, "--density", "nan") + ["--out", "{R}/m"], "argument --density", None),
    ("merge-density-text", _with(MERGE, "--density", "half") + ["--out", "{R}/m"], "argument --density: expected a number", None),
    ("merge-density-missing", _with(MERGE, "--density", None) + ["--out", "{R}/m"], "--density is required", None),
    ("merge-density-for-linear", ["merge", *LIB, "--method", "linear", "--density", "0.5", "--out", "{R}/m"], "--density does not apply", None),
    ("merge-lambda-inf", [*MERGE, "--lambda", "inf", "--out", "{R}/m"], "argument --lambda", None),
    ("merge-weights-nan", [*MERGE, "--weights", "1", "nan", "1", "1", "--out", "{R}/m"], "argument --weights", None),
    ("merge-weights-count", [*MERGE, "--weights", "1", "2", "--out", "{R}/m"], "--weights has 2 values for 4 adapters", None),
    ("merge-unknown-method", ["merge", *LIB, "--method", "average", "--out", "{R}/m"], "argument --method", None),
    ("merge-adapters-missing", ["merge", "--adapters", "{R}/nope", "--method", "linear", "--out", "{R}/m"], "nope", None),
    ("merge-adapter-config-corrupt", ["merge", "--adapters", "{R}/badcfg", "--method", "linear", "--out", "{R}/m"], "adapter_config.json: not valid JSON", _write("badcfg/x/adapter_config.json", "{oops")),
    ("merge-adapter-nan", ["merge", "--adapters", "{R}/nan_adapter", "{R}/library/t1", "--method", "linear", "--out", "{R}/m"], "NaN", _nan_adapter),
    ("merge-empty-library", ["merge", "--adapters", "{R}/notes", "--method", "linear", "--out", "{R}/m"], "no adapter directories", None),
    ("merge-library-dangling-symlink", ["merge", "--adapters", "{R}/lib_dangling", "--method", "linear", "--out", "{R}/m"], "{R}/lib_dangling/t9: dangling symlink", _library_copy("lib_dangling", lambda lib: (lib / "t9").symlink_to(lib / "gone"))),
    ("merge-library-dir-without-adapter", ["merge", "--adapters", "{R}/lib_extra_dir", "--method", "linear", "--out", "{R}/m"], "{R}/lib_extra_dir/notes: not a PEFT adapter directory", _library_copy("lib_extra_dir", lambda lib: (lib / "notes").mkdir())),
    ("merge-duplicate-adapter-names", ["merge", "--adapters", "{R}/library/t0", "{R}/lib_dup/t0", "--method", "linear", "--out", "{R}/m"], "two adapters named 't0': {R}/library/t0 and {R}/lib_dup/t0", _library_copy("lib_dup", lambda lib: None)),
    ("merge-adapter-untargeted-module", ["merge", "--adapters", "{R}/lib_untargeted", "--method", "linear", "--out", "{R}/m"], "{R}/lib_untargeted/t0/adapter_model.safetensors: has LoRA tensors for model.layers.0.self_attn.v_proj, which adapter_config.json could not have targeted", _library_copy("lib_untargeted", _untargeted)),
    ("merge-library-mixed-key-prefixes", ["merge", "--adapters", "{R}/lib_mixed_prefix", "--method", "linear", "--out", "{R}/m"], "{R}/lib_mixed_prefix/t1/adapter_model.safetensors: keys start with 'base_model.model.model.language_model.'", _library_copy("lib_mixed_prefix", _language_model_keys)),
    # ---- score
    ("score-examples-missing", _with(SCORE, "--examples", "{R}/nope.jsonl"), "--examples {R}/nope.jsonl: no such file", None),
    ("score-examples-dir", _with(SCORE, "--examples", "{R}/examples"), "is a directory", None),
    ("score-examples-not-utf8", _with(SCORE, "--examples", "{R}/latin1.jsonl"), "latin1.jsonl:2: not valid UTF-8", _bad_utf8("latin1.jsonl")),
    ("score-examples-bad-json", _with(SCORE, "--examples", "{R}/broken.jsonl"), "broken.jsonl:2: malformed JSON", _write("broken.jsonl", '{"prompt": "a", "target": "b"}\n{"prompt": \n')),
    ("score-examples-no-target", _with(SCORE, "--examples", "{R}/notarget.jsonl"), "notarget.jsonl:1: missing 'target'", _write("notarget.jsonl", '{"prompt": "a"}\n')),
    ("score-examples-empty", _with(SCORE, "--examples", "{R}/empty.jsonl"), "empty.jsonl: no examples", _write("empty.jsonl", "\n\n")),
    ("score-out-is-examples", [*SCORE, "--out", "{R}/score.jsonl"], "is the input --examples", None),
    ("score-out-is-dir", [*SCORE, "--out", "{R}/notes"], "is a directory; give a file path", None),
    ("score-out-below-file", [*SCORE, "--out", "{R}/plain.txt/s.json"], "is a file, not a directory", None),
    ("score-out-foreign-file", [*SCORE, "--out", "{R}/foreign.json"], "not a previous output of `d2c score`", None),
    ("score-out-unwritable", [*SCORE, "--out", "/proc/d2c-score.json"], "cannot write in /proc", None),
    ("score-out-inside-base", [*SCORE, "--out", "{R}/base/s.json"], "is inside the input --base", None),
    ("score-out-inside-adapter", [*SCORE, "--adapter", "{R}/library/t0", "--out", "{R}/library/t0/s.json"], "is inside the input --adapter", None),
    ("score-batch-size-0", [*SCORE, "--batch-size", "0"], "argument --batch-size: must be an integer >= 1", None),
    ("score-dtype-float64", [*SCORE, "--dtype", "float64"], "argument --dtype", None),
    ("score-base-missing", _with(SCORE, "--base", "{R}/nope"), "no such file or directory", None),
    ("score-base-no-config", _with(SCORE, "--base", "{R}/base_noconfig"), "has no config.json", _copy_base("base_noconfig", drop="config.json")),
    ("score-base-not-gguf", _with(SCORE, "--base", "{R}/plain.txt"), "is not a .gguf file", None),
    ("score-base-corrupt-gguf", _with(SCORE, "--base", "{R}/fake.gguf"), "not a readable GGUF", _write("fake.gguf", "GGUF but not really")),
    ("score-adapter-missing", [*SCORE, "--adapter", "{R}/nope"], "nope", None),
    ("score-adapter-other-model-same-dir-name", [*_with(SCORE, "--base", "{R}/other/base"), "--adapter", "{R}/lib_by_path/t0"], "(weights fingerprint", _OTHER_MODEL),
    # ---- generate
    ("generate-max-new-tokens-0", [*GEN, "--max-new-tokens", "0"], "argument --max-new-tokens", None),
    ("generate-max-new-tokens-negative", [*GEN, "--max-new-tokens", "-3"], "argument --max-new-tokens", None),
    ("generate-no-prompt", ["generate", "--base", "{R}/base"], "--prompt", None),
    ("generate-base-missing", _with(GEN, "--base", "{R}/nope"), "no such file or directory", None),
    ("generate-adapter-missing", [*GEN, "--adapter", "{R}/nope"], "nope", None),
    # ---- train
    ("train-learning-rate-negative", [*TRAIN, "--learning-rate", "-1", "--out", "{R}/tr"], "argument --learning-rate: must be a number > 0", None),
    ("train-learning-rate-0", [*TRAIN, "--learning-rate", "0", "--out", "{R}/tr"], "argument --learning-rate", None),
    ("train-learning-rate-nan", [*TRAIN, "--learning-rate", "nan", "--out", "{R}/tr"], "argument --learning-rate", None),
    ("train-max-steps-0", _with(TRAIN, "--max-steps", "0") + ["--out", "{R}/tr"], "argument --max-steps", None),
    ("train-rank-0", [*TRAIN, "--rank", "0", "--out", "{R}/tr"], "argument --rank", None),
    ("train-alpha-0", [*TRAIN, "--alpha", "0", "--out", "{R}/tr"], "argument --alpha", None),
    ("train-batch-size-0", [*TRAIN, "--batch-size", "0", "--out", "{R}/tr"], "argument --batch-size", None),
    ("train-eval-every-0", [*TRAIN, "--eval-every", "0", "--out", "{R}/tr"], "argument --eval-every", None),
    ("train-warmup-negative", [*TRAIN, "--warmup-steps", "-1", "--out", "{R}/tr"], "argument --warmup-steps", None),
    ("train-unknown-module", [*TRAIN, "--target-modules", "foo_proj", "--out", "{R}/tr"], "argument --target-modules", None),
    ("train-tasks-missing", _with(TRAIN, "--tasks", "{R}/nope") + ["--out", "{R}/tr"], "--tasks {R}/nope: no such directory", None),
    ("train-only-unknown", [*TRAIN, "--only", "zz", "--out", "{R}/tr"], "--only: tasks ['zz']", None),
    ("train-out-is-tasks", [*TRAIN, "--out", "{R}/examples"], "is the input --tasks", None),
    ("train-out-inside-tasks", [*TRAIN, "--out", "{R}/examples/lib"], "is inside the input --tasks", None),
    ("train-out-is-base", [*TRAIN, "--out", "{R}/base"], "is the input --base", None),
    ("train-out-existing-file", [*TRAIN, "--out", "{R}/plain.txt"], "is an existing file", None),
    ("train-out-foreign-library", [*TRAIN, "--out", "{R}/library"], "is not a `d2c train` output", None),
    ("train-not-utf8", _with(TRAIN, "--tasks", "{R}/tasks_latin1") + ["--out", "{R}/tr"], "train.jsonl:2: not valid UTF-8", _bad_utf8("tasks_latin1/t0/train.jsonl")),
    ("train-too-few-examples", [*TRAIN, "--out", "{R}/tr"], "too few for a validation slice", None),
    # ---- cluster
    ("cluster-out-is-library-force", _with(CLUSTER, "--out", "{R}/library") + ["--force"], "is the input --library", None),
    ("cluster-out-is-library", _with(CLUSTER, "--out", "{R}/library"), "is the input --library", None),
    ("cluster-out-inside-library", _with(CLUSTER, "--out", "{R}/library/out"), "is inside the input --library", None),
    ("cluster-out-contains-examples", _with(CLUSTER, "--out", "{R}") + ["--force"], "contains the input --library", None),
    ("cluster-out-is-base", _with(CLUSTER, "--out", "{R}/base") + ["--force"], "is the input --base", None),
    ("cluster-out-existing-file", _with(CLUSTER, "--out", "{R}/plain.txt"), "is an existing file", None),
    ("cluster-out-below-file", _with(CLUSTER, "--out", "{R}/plain.txt/out"), "is a file, not a directory", None),
    ("cluster-out-unwritable", _with(CLUSTER, "--out", "/proc/d2c-cluster"), "cannot write in /proc", None),
    ("cluster-out-foreign-dir-force", _with(CLUSTER, "--out", "{R}/notes") + ["--force"], "not a previous `d2c cluster` output", None),
    ("cluster-out-previous-no-flag", _with(CLUSTER, "--out", "{R}/clustered"), "pass --resume", None),
    ("cluster-resume-other-settings", _with(CLUSTER, "--out", "{R}/clustered") + ["--resume", "--tol", "0.5"], "other settings (['tol'])", None),
    ("cluster-resume-corrupt-settings", _with(CLUSTER, "--out", "{R}/half_run") + ["--resume"], "settings.json is missing or not JSON", _corrupt_settings),
    ("cluster-examples-missing", _with(CLUSTER, "--examples", "/nonexistent"), "--examples /nonexistent: no such directory", None),
    ("cluster-library-missing", _with(CLUSTER, "--library", "{R}/nope"), "nope", None),
    ("cluster-max-iters-0", [*CLUSTER, "--max-iters", "0"], "argument --max-iters", None),
    ("cluster-candidates-0", [*CLUSTER, "--candidates-per-call", "0"], "argument --candidates-per-call", None),
    ("cluster-screen-min-corr-2", [*CLUSTER, "--screen-min-corr", "2"], "argument --screen-min-corr", None),
    ("cluster-tol-negative", [*CLUSTER, "--tol", "-1"], "argument --tol", None),
    ("cluster-visit-fraction-0", [*CLUSTER, "--visit-fraction", "0"], "argument --visit-fraction", None),
    ("cluster-visit-fraction-without-proxy", _with(CLUSTER, "--method", "d2c") + ["--destinations", "0", "--visit-fraction", "0.5"], "(--visit-fraction) ranks adapters by the destination proxy", None),
    ("cluster-devices-0", [*CLUSTER, "--devices", "0"], "argument --devices", None),
    ("cluster-density-0", _with(CLUSTER, "--density", "0"), "argument --density", None),
    ("cluster-budget-0", _with(CLUSTER, "--budget", "0"), "budget", None),
    ("cluster-budget-too-big", _with(CLUSTER, "--budget", "9"), "budget", None),
    ("cluster-dev-not-utf8", _with(CLUSTER, "--examples", "{R}/ex_latin1"), "dev.jsonl:2: not valid UTF-8", _bad_utf8("ex_latin1/t0/dev.jsonl")),
    ("cluster-other-model-same-dir-name", _with(_with(CLUSTER, "--base", "{R}/other/base"), "--library", "{R}/lib_by_path"), "a different model", _OTHER_MODEL),
    ("cluster-force-keeps-user-file", [*_with(CLUSTER, "--out", "{R}/clustered_notes"), "--force"], "did not write (notes.txt)", _with_notes("clustered", "clustered_notes")),
    ("merge-force-keeps-user-file", [*MERGE, "--out", "{R}/merged_notes", "--force"], "did not write (notes.txt)", _with_notes("merged", "merged_notes")),
    ("train-seed-negative", [*TRAIN, "--seed", "-1", "--out", "{R}/tr"], "argument --seed: must be an integer >= 0", None),
    ("merge-seed-negative", [*_with(MERGE, "--method", "dare_ties"), "--seed", "-1", "--out", "{R}/m"], "argument --seed: must be an integer >= 0", None),
    ("cluster-seed-negative", _with(CLUSTER, "--seed", "-1"), "argument --seed: must be an integer >= 0", None),
    ("evaluate-seed-negative", [*EVAL_DIR, "--seed", "-1", "--out", "{R}/e.json"], "argument --seed: must be an integer >= 0", None),
    ("cluster-tasks-without-dev", _with(CLUSTER, "--examples", "{R}/notes"), "--tasks {R}/notes: no dev examples for tasks ['t0', 't1', 't2', 't3']", None),
    ("cluster-d2c-tasks-one-without-dev", _with(D2C, "--examples", "{R}/ex_no_t3"), "--tasks {R}/ex_no_t3: no dev examples for tasks ['t3']; every adapter needs {R}/ex_no_t3/<task>/dev.jsonl", _without("ex_no_t3", "t3/dev.jsonl")),
    ("cluster-resume-no-usable-checkpoint", [*_with(D2C, "--out", "{R}/d2c_corrupt"), "--resume"], "{R}/d2c_corrupt/.search/ckpt: no usable checkpoint (step 1 (", _stopped_d2c("d2c_corrupt", _garble_every_step)),
    ("evaluate-assignment-duplicate-task", [*EVAL, "--assignment", "{R}/dup_assign.json", "--out", "{R}/e.json"], "task 't0' appears more than once", _write("dup_assign.json", '{"t0": 0, "t1": 1, "t0": 1}')),
    # ---- evaluate
    ("evaluate-assignment-missing", [*EVAL, "--assignment", "{R}/nope.json", "--out", "{R}/e.json"], "--assignment {R}/nope.json: no such file", None),
    ("evaluate-assignment-corrupt", [*EVAL, "--assignment", "{R}/bad_assign.json", "--out", "{R}/e.json"], "bad_assign.json: not valid JSON", _write("bad_assign.json", "{t0: 1")),
    ("evaluate-out-is-assignment", [*EVAL, "--assignment", "{R}/clustered/assignment.json", "--out", "{R}/clustered/assignment.json"], "is the input --assignment", None),
    ("evaluate-out-inside-clustering", [*EVAL_DIR, "--out", "{R}/clustered/scores.json"], "is inside the input --assignment", None),
    ("evaluate-out-is-dir", [*EVAL_DIR, "--out", "{R}/notes"], "is a directory; give a file path", None),
    ("evaluate-out-foreign-file", [*EVAL_DIR, "--out", "{R}/foreign.json"], "not a previous output of `d2c evaluate`", None),
    ("evaluate-out-inside-library", [*EVAL_DIR, "--out", "{R}/library/e.json"], "is inside the input --library", None),
    ("evaluate-limit-0", [*EVAL_DIR, "--limit", "0", "--out", "{R}/e.json"], "argument --limit", None),
    ("evaluate-batch-size-0", [*EVAL_DIR, "--batch-size", "0", "--out", "{R}/e.json"], "argument --batch-size", None),
    ("evaluate-max-new-tokens-0", [*EVAL_DIR, "--max-new-tokens", "0", "--out", "{R}/e.json"], "argument --max-new-tokens", None),
    ("evaluate-tasks-missing", [*_with(EVAL_DIR, "--tasks", "{R}/nope"), "--out", "{R}/e.json"], "--tasks {R}/nope: no such directory", None),
    ("evaluate-split-dev", [*EVAL_DIR, "--split", "dev", "--out", "{R}/e.json"], "argument --split", None),
    ("evaluate-other-model-same-dir-name", [*_with(EVAL_DIR, "--base", "{R}/other/base"), "--no-relative", "--out", "{R}/e.json"], "clustering --assignment {R}/clustered was made for base model '{R}/base'", _OTHER_MODEL),
    ("evaluate-library-other-model", [*_with(_with(EVAL, "--base", "{R}/other/base"), "--library", "{R}/lib_by_path"), "--assignment", "{R}/clustered", "--out", "{R}/e.json"], "a different model", _OTHER_MODEL),
    # ---- export
    ("export-other-model", ["export", "--clusters", "{R}/clustered", "--base", "{R}/other.gguf", "--out", "{R}/ex"], "a different model", _gguf_base("other.gguf", shift=0.5)),
    ("evaluate-test-not-utf8", [*_with(EVAL_DIR, "--tasks", "{R}/ev_latin1"), "--no-relative", "--out", "{R}/e.json"], "test.jsonl:2: not valid UTF-8", _bad_utf8("ev_latin1/t0/test.jsonl")),
    *UNSUPPORTED_BASE_CASES,
]  # fmt: skip


def _fill(argv: list[str], root: Path) -> list[str]:
    return [a.replace("{R}", str(root)) for a in argv]


def _out_of(argv: list[str]) -> Path | None:
    return Path(argv[argv.index("--out") + 1]) if "--out" in argv else None


@pytest.mark.parametrize("argv, expected, setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_that_changes_nothing(world, capsys, argv, expected, setup):
    if setup is not None:
        setup(world)
    argv = _fill(argv, world)
    out = _out_of(argv)
    before = tree_state(world)
    out_existed = out is not None and (out.exists() or out.is_symlink())
    rc, err = run_cli(argv, capsys)
    assert rc not in (0, None), f"exit {rc}; stderr:\n{err}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith("d2c"), errors[0]
    assert expected.replace("{R}", str(world)) in errors[0], errors[0]
    # Inputs unchanged, nothing created in or beside OUT (all of it lies in the world).
    assert tree_state(world) == before
    if out is not None and not out_existed:
        assert not out.exists()


# `python -m d2c_jax.demo` (`make demo`): the same promises, its own prog name.
DEMO = [
    "--base",
    "{R}/base",
    "--library",
    "{R}/library",
    "--tasks",
    "{R}/examples",
    "--budget",
    "2",
    "--dev-per-task",
    "2",
    "--test-per-task",
    "3",
]
DEMO_OUT = ["--out", "{R}/demo_out"]
DEMO_CASES = [
    ("demo-budget-0", [*_with(DEMO, "--budget", "0"), *DEMO_OUT], "argument --budget: must be more than 0", None),
    ("demo-budget-0-percent", [*_with(DEMO, "--budget", "0%"), *DEMO_OUT], "argument --budget: must be more than 0", None),
    ("demo-budget-text", [*_with(DEMO, "--budget", "lots"), *DEMO_OUT], "argument --budget: expected K", None),
    ("demo-budget-fractional-k", [*_with(DEMO, "--budget", "1.5"), *DEMO_OUT], "argument --budget: K must be an integer", None),
    ("demo-budget-too-big", [*_with(DEMO, "--budget", "9"), *DEMO_OUT], "K exceeds the library's N=4 adapters", None),
    ("demo-dev-per-task-0", [*_with(DEMO, "--dev-per-task", "0"), *DEMO_OUT], "argument --dev-per-task: must be an integer >= 1", None),
    ("demo-test-per-task-negative", [*_with(DEMO, "--test-per-task", "-1"), *DEMO_OUT], "argument --test-per-task: must be an integer >= 1", None),
    ("demo-test-per-task-text", [*_with(DEMO, "--test-per-task", "all"), *DEMO_OUT], "argument --test-per-task: expected an integer", None),
    ("demo-seed-negative", [*DEMO, "--seed", "-1", *DEMO_OUT], "argument --seed: must be an integer >= 0", None),
    ("demo-library-missing", [*_with(DEMO, "--library", "{R}/nope"), *DEMO_OUT], "--library {R}/nope: no such directory", None),
    ("demo-library-is-file", [*_with(DEMO, "--library", "{R}/plain.txt"), *DEMO_OUT], "--library {R}/plain.txt: is not a directory", None),
    ("demo-tasks-missing", [*_with(DEMO, "--tasks", "{R}/nope"), *DEMO_OUT], "--tasks {R}/nope: no such directory", None),
    ("demo-base-missing", [*_with(DEMO, "--base", "{R}/nope"), *DEMO_OUT], "--base {R}/nope: no such file or directory", None),
    ("demo-out-is-library", [*DEMO, "--out", "{R}/library"], "is the input --library", None),
    ("demo-out-inside-library", [*DEMO, "--out", "{R}/library/demo"], "is inside the input --library", None),
    ("demo-out-inside-tasks", [*DEMO, "--out", "{R}/examples/demo"], "is inside the input --tasks", None),
    ("demo-out-inside-base", [*DEMO, "--out", "{R}/base/demo"], "is inside the input --base", None),
    ("demo-out-contains-inputs", [*DEMO, "--out", "{R}"], "contains the input --library", None),
    ("demo-out-existing-file", [*DEMO, "--out", "{R}/plain.txt"], "is an existing file", None),
    ("demo-out-below-file", [*DEMO, "--out", "{R}/plain.txt/demo"], "is a file, not a directory", None),
    ("demo-out-unwritable", [*DEMO, "--out", "/proc/d2c-demo"], "cannot write in /proc", None),
]  # fmt: skip


@pytest.mark.parametrize(
    "argv, expected, setup", [c[1:] for c in DEMO_CASES], ids=[c[0] for c in DEMO_CASES]
)
def test_bad_demo_input_is_a_clear_error_that_changes_nothing(world, capsys, argv, expected, setup):
    from d2c_jax import demo

    argv = _fill(argv, world)
    out = _out_of(argv)
    before = tree_state(world)
    out_existed = out.exists() or out.is_symlink()
    try:
        rc = demo.main(argv)
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    captured = capsys.readouterr()
    err = captured.err
    assert rc not in (0, None), f"exit {rc}; stderr:\n{err}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith("python -m d2c_jax.demo: error: "), errors[0]
    assert expected.replace("{R}", str(world)) in errors[0], errors[0]
    assert captured.out == ""  # stopped before any work
    assert tree_state(world) == before
    if not out_existed:
        assert not out.exists()


def test_corpus_is_large_and_covers_every_command():
    commands = {argv[0] for _, argv, _, _ in CASES}
    assert {"merge", "score", "generate", "train", "cluster", "evaluate"} <= commands
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len(DEMO_CASES) >= 10
    assert len({c[0] for c in CASES + DEMO_CASES}) == len(CASES) + len(DEMO_CASES)


# ------------------------------------------------------------- rerun always works


def _fail(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_failed_cluster_run_cleans_up_and_the_same_command_reruns(
    world, tmp_path, monkeypatch, capsys
):
    import d2c_jax.cluster.output

    out = tmp_path / "out"
    argv = cluster_args(world, out, "--method", "random")
    monkeypatch.setattr(d2c_jax.cluster.output, "save_clusters", _fail)
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "the failed run left files behind"
    monkeypatch.undo()
    assert main(argv) == 0
    assert (out / "manifest.json").is_file() and not (out / ".search").exists()


def test_failed_force_run_restores_the_previous_output(world, tmp_path, monkeypatch, capsys):
    import d2c_jax.cluster.output

    out = tmp_path / "out"
    shutil.copytree(world / "clustered", out)
    before = tree_state(tmp_path)
    monkeypatch.setattr(d2c_jax.cluster.output, "save_clusters", _fail)
    rc, _ = run_cli([*cluster_args(world, out, "--method", "random"), "--force"], capsys)
    assert rc == 2
    assert tree_state(tmp_path) == before


def _killed_between_clusters(out: Path) -> None:
    for name in ("manifest.json", "log.jsonl", "assignment.json"):
        (out / name).unlink()
    shutil.copytree(out / "cluster_1", out / ".cluster_1.x7k2")
    shutil.rmtree(out / "cluster_1")
    (out / ".cluster_1.x7k2" / "adapter_model.safetensors").write_bytes(b"half")


def _killed_before_manifest(out: Path) -> None:
    (out / "manifest.json").unlink()
    (out / ".log.jsonl.tmp").write_text("partial")


def _killed_after_manifest(out: Path) -> None:
    (out / ".search" / "ckpt" / "3").mkdir(parents=True)


def _killed_during_cleanup(out: Path) -> None:
    _killed_after_manifest(out)
    (out / ".search" / "settings.json").unlink()


@pytest.mark.parametrize(
    "kill",
    [
        _killed_between_clusters,
        _killed_before_manifest,
        _killed_after_manifest,
        _killed_during_cleanup,
    ],
    ids=["between-clusters", "before-manifest", "after-manifest", "during-cleanup"],
)
def test_a_killed_final_write_resumes_to_the_files_of_an_uninterrupted_run(world, tmp_path, kill):
    reference = world / "clustered"  # an uninterrupted run of the same command
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    (out / ".search").mkdir()
    (out / ".search" / "settings.json").write_text(json.dumps(settings))
    kill(out)
    assert main([*cluster_args(world, out, "--method", "random"), "--resume"]) == 0
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*"))  # noqa: E731
    assert files(out) == files(reference), "hidden leftovers or missing files"
    for name in (
        "assignment.json",
        "cluster_0/adapter_model.safetensors",
        "cluster_1/adapter_model.safetensors",
    ):
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def _full_d2c(root: Path) -> Path:
    """{R}/d2c_full: the uninterrupted run of `D2C`."""
    out = root / "d2c_full"
    if not out.exists():
        assert main(_fill(_with(D2C, "--out", str(out)), root)) == 0
    return out


def _killed_during_the_next_save(checkpoints: Path) -> None:
    from tests.test_cluster_d2c import kill_during_save

    kill_during_save(checkpoints, 2)


def _garbled_latest(checkpoints: Path) -> None:
    from tests.test_cluster_d2c import garble_data

    garble_data(checkpoints / "1")


def _unmarked_newest(checkpoints: Path) -> None:
    from tests.test_cluster_d2c import unmarked_step

    unmarked_step(checkpoints, 2)


@pytest.mark.parametrize(
    "damage, skipped",
    [
        (_garbled_latest, "step 1 (default/d/"),
        (_killed_during_the_next_save, "step 2 (half-written: killed during a save)"),
        (_unmarked_newest, "step 2 (half-written: no commit_success.txt)"),
    ],
    ids=["garbled-latest-step", "killed-during-a-save", "step-without-marker"],
)
def test_resume_skips_a_bad_checkpoint_and_ends_as_an_uninterrupted_run(
    world, tmp_path, capsys, damage, skipped
):
    reference = _full_d2c(world)
    out = tmp_path / "out"
    shutil.copytree(_stopped_template(world), out)
    damage(out / ".search" / "ckpt")
    rc, err = run_cli([*_fill(_with(D2C, "--out", str(out)), world), "--resume"], capsys)
    assert rc == 0, err
    assert "Traceback" not in err and "zarr" not in err, err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1, err
    assert f"{out}/.search/ckpt: skipped checkpoint {skipped}" in warnings[0], warnings[0]
    resumed_from = "step 0" if damage is _garbled_latest else "step 1"
    assert warnings[0].endswith(f"resuming from {resumed_from}"), warnings[0]
    assert (out / "assignment.json").read_bytes() == (reference / "assignment.json").read_bytes()
    objectives = lambda run: [json.loads(x)["objective"] for x in (run / "log.jsonl").open()]  # noqa: E731
    assert objectives(out) == objectives(reference)  # the same path (seconds differ)
    assert not (out / ".search").exists()


# ------------------------------------------------------------- one same-base rule


def test_same_base_is_decided_by_weights_not_by_display_name(world, tmp_path, monkeypatch):
    from d2c_jax.adapters import check_adapter_for_base
    from d2c_jax.library import AdapterLibrary
    from d2c_jax.models import KNOWN_BASES, load_base
    from d2c_jax.models.hf import load_hf_weights, save_hf_weights
    from d2c_jax.models.identity import BaseModelWarning

    library = AdapterLibrary.load(world / "library")  # recorded for "tiny-llama"
    # An HF copy at another path, under another display name, in bfloat16.
    copy = tmp_path / "renamed"
    shutil.copytree(world / "base", copy)
    config, weights = load_hf_weights(copy)
    import ml_dtypes

    bf16 = {k: v for k, v in weights.items() if k != "layers"}
    bf16 = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in bf16.items()}
    bf16["layers"] = {
        k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in weights["layers"].items()
    }
    for path in copy.glob("*.safetensors"):
        path.unlink()
    save_hf_weights(copy, config, bf16, extra_config={"_name_or_path": "someone/renamed"})
    original = load_base(str(world / "base"))
    renamed = load_base(str(copy))
    assert renamed.fingerprint == original.fingerprint
    with pytest.warns(BaseModelWarning, match="'tiny-llama'.*'someone/renamed'"):
        check_adapter_for_base(renamed, library)  # an unreadable recorded base: names warn
    monkeypatch.setitem(KNOWN_BASES, original.fingerprint, "tiny-llama")
    renamed = load_base(str(copy))
    assert renamed.name == "tiny-llama"
    check_adapter_for_base(renamed, library)
    # Different weights under the same file layout are a different base.
    other = tmp_path / "other"
    shutil.copytree(world / "base", other)
    weights["embed"] = np.asarray(weights["embed"]) + 1.0
    for path in other.glob("*.safetensors"):
        path.unlink()
    save_hf_weights(other, config, weights, extra_config={"_name_or_path": "other"})
    assert load_base(str(other)).fingerprint != original.fingerprint


def _same_base_commands(root: Path, base: str, gguf: str) -> dict[str, list[str]]:
    """score, cluster, evaluate and export, each against a `base` (and `gguf`)."""
    return {
        "score": [
            *_fill(_with(SCORE, "--base", base), root),
            "--adapter",
            f"{root}/lib_by_path/t0",
        ],
        "cluster": cluster_args(root, root / "same_base_cl", "--method", "random") + ["--force"],
        "evaluate": _fill([*_with(EVAL_DIR, "--base", base), "--no-relative"], root)
        + ["--out", f"{root}/same_base_e.json"],
        "export": ["export", "--clusters", f"{root}/clustered", "--base", gguf]
        + ["--out", f"{root}/same_base_ex", "--force"],
    }


@pytest.mark.parametrize("command", ["score", "cluster", "evaluate", "export"])
def test_an_identical_copy_under_another_name_is_the_same_base(world, capsys, command):
    _each(_library_for_path, _other_model("base-copy2", shift=0.0, hub_name="someone/copy2"))(world)
    _gguf_base("copy2.gguf", shift=0.0)(world)
    argv = _same_base_commands(world, str(world / "base-copy2"), str(world / "copy2.gguf"))
    argv = argv[command]
    if command == "cluster":  # the library records the original base by its path
        argv = _with(
            _with(argv, "--base", str(world / "base-copy2")),
            "--library",
            str(world / "lib_by_path"),
        )
    rc, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "warning" not in err and "error" not in err, err


def test_an_unreadable_recorded_base_with_another_name_is_a_warning(world, capsys):
    _other_model("renamed_base", shift=0.0, hub_name="someone/renamed")(world)
    argv = [*_fill(_with(SCORE, "--base", "{R}/renamed_base"), world), "--adapter"]
    rc, err = run_cli([*argv, str(world / "library" / "t0")], capsys)  # records "tiny-llama"
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and warnings[0].startswith("d2c score: warning: "), err
    assert "'tiny-llama'" in warnings[0] and "cannot be read" in warnings[0]


@pytest.mark.slow
def test_the_embedded_gguf_by_path_is_the_default_base(real_base):
    from d2c_jax.library import AdapterLibrary, embedded_library_dir
    from d2c_jax.models import DEFAULT_MODEL_NAME, KNOWN_BASES, default_gguf_path, load_base

    assert KNOWN_BASES[real_base.fingerprint] == DEFAULT_MODEL_NAME
    by_path = load_base(str(default_gguf_path()))
    assert by_path.name == DEFAULT_MODEL_NAME and by_path.fingerprint == real_base.fingerprint
    from d2c_jax.adapters import check_adapter_for_base

    check_adapter_for_base(by_path, AdapterLibrary.load(embedded_library_dir()))


@pytest.mark.parametrize(
    "argv, expected, setup",
    [c[1:] for c in UNSUPPORTED_BASE_CASES],
    ids=[c[0] for c in UNSUPPORTED_BASE_CASES],
)
def test_an_unsupported_base_is_one_line_exit_2_before_any_work(
    world, capsys, monkeypatch, argv, expected, setup
):
    """Exit 2 and stderr of exactly one line (no "loading ..." progress either): no
    library, example or model was opened (the loaders would fail the test)."""
    import d2c_jax.examples
    import d2c_jax.models
    from d2c_jax.library import AdapterLibrary

    def refuse(*args, **kwargs):
        raise AssertionError("work was done before the base model was refused")

    monkeypatch.setattr(d2c_jax.models, "load_base", refuse)
    monkeypatch.setattr(d2c_jax.examples, "read_examples", refuse)
    monkeypatch.setattr(AdapterLibrary, "load", refuse)
    setup(world)
    rc, err = run_cli(_fill(argv, world), capsys)
    assert rc == 2, err
    assert err.splitlines() == [f"d2c {argv[0]}: error: {expected.replace('{R}', str(world))}"]


@pytest.mark.parametrize("method", ["kmeans", "mbc", "random", "kmerge"])
def test_data_free_clustering_and_merge_need_no_supported_base(world, tmp_path, capsys, method):
    """merge reads no base; a data-free clustering without --tasks loads none, so an
    unsupported --base does not stop it."""
    _BERT(world)
    argv = cluster_args(world, tmp_path / method, "--method", method)
    argv = _with(_with(argv, "--base", str(world / "base_bert")), "--examples", None)
    rc, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert (tmp_path / method / "assignment.json").is_file()
    if method == "kmeans":
        merge = _fill([*MERGE, "--out", str(tmp_path / "merged")], world)
        assert run_cli(merge, capsys)[0] == 0


def test_a_library_of_differently_named_bases_warns_on_one_line(world, tmp_path, capsys):
    """`LibraryWarning` (adapters recording different base names; shapes decide) prints
    as one ``d2c CMD: warning:`` line, not Python's file:line form."""
    import warnings as warnings_module

    library = tmp_path / "lib"
    shutil.copytree(world / "library", library)
    config_path = library / "t1" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"base_model_name_or_path": "someone/else"}))
    argv = ["merge", "--adapters", str(library), "--method", "linear"]
    with warnings_module.catch_warnings():
        warnings_module.simplefilter("always")  # not deduplicated by an earlier test
        rc, err = run_cli([*argv, "--out", str(tmp_path / "merged")], capsys)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("d2c merge: warning: "), err
    assert "someone/else" in lines[0] and "Warning" not in lines[0], err


# ------------------------------------------------------------------ friendly CLI


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("d2c-jax ")


def test_every_option_has_help_with_its_default():
    import argparse

    from d2c_jax.cli import HelpFormatter, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, command in sub.choices.items():
        formatter = HelpFormatter(prog=name)
        for action in command._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            text = formatter._get_help_string(action)
            if not text:
                missing.append(f"{name} {action.option_strings[0]}: no help")
            elif action.default not in (None, False, argparse.SUPPRESS) and (
                "default" not in text.lower()
            ):
                missing.append(f"{name} {action.option_strings[0]}: no default")
    assert missing == []


def test_outputs_are_0644_and_valid_json(world, tmp_path):
    out = tmp_path / "scores.json"
    assert (
        main(
            [
                "score",
                "--base",
                str(world / "base"),
                "--examples",
                str(world / "score.jsonl"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert record["prompt_prefix_tokens"] == ["<|endoftext|>"]
    assert (
        main(
            [
                "score",
                "--base",
                str(world / "base"),
                "--examples",
                str(world / "score.jsonl"),
                "--out",
                str(out),
            ]
        )
        == 0
    ), "a previous score output is replaced"
    weights = world / "merged" / "adapter_model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


# ------------------------------------------------- the output directory is a transaction


def test_a_locked_out_is_refused_with_the_holders_pid(world, tmp_path, capsys):
    import os

    from d2c_jax.commands.outdir import locked

    out = tmp_path / "out"
    with locked(out):  # another run (a second open file description) holds it
        rc, err = run_cli(cluster_args(world, out, "--method", "random"), capsys)
    assert rc == 2 and "Traceback" not in err
    assert f"being written by another d2c run (pid {os.getpid()})" in err
    assert not out.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(world, tmp_path):
    from d2c_jax.commands.outdir import lock_path

    out = tmp_path / "out"
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("999999999\n")  # no process holds its flock: killed with -9
    assert main(cluster_args(world, out, "--method", "random")) == 0
    assert not path.exists()


def test_sigterm_during_force_restores_the_previous_output(world, tmp_path, monkeypatch, capsys):
    import os
    import signal

    import d2c_jax.cluster.output

    out = tmp_path / "out"
    shutil.copytree(world / "clustered", out)
    before = tree_state(tmp_path)
    monkeypatch.setattr(
        d2c_jax.cluster.output,
        "save_clusters",
        lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM),
    )
    rc, err = run_cli([*cluster_args(world, out, "--method", "random"), "--force"], capsys)
    assert rc == 143 and "terminated" in err and "Traceback" not in err
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("new_run_finished", [False, True], ids=["unfinished", "finished"])
def test_the_next_run_finishes_a_killed_force(world, tmp_path, capsys, new_run_finished):
    """kill -9 of a --force run leaves the previous output in .OUT.replaced.*/OUT."""
    out = tmp_path / "out"
    aside = tmp_path / ".out.replaced.k9x2"
    aside.mkdir()
    shutil.copytree(world / "clustered", aside / "out")
    if new_run_finished:
        shutil.copytree(world / "clustered", out)
    else:
        (out / ".search").mkdir(parents=True)
        (out / ".search" / "settings.json").write_text("{}")
    argv = cluster_args(world, out, "--method", "random")
    rc, err = run_cli([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert "an interrupted --force run was found" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*"))  # noqa: E731
    assert files(out) == files(world / "clustered")


# ------------------------------------------------------------- machine faults


def _limit_file_size():
    """preexec_fn: files may not grow past 8 KiB (EFBIG instead of SIGXFSZ), the disk
    full the tests can make without root or a small tmpfs."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))


def _big_library(root: Path) -> None:
    """big_lib/: two adapters whose merge (about 60 KiB) does not fit the limit."""
    from tests.conftest import tiny_llama_config

    target = root / "big_lib"
    if not target.exists():
        save_random_library(target, tiny_llama_config(), ("t0", "t1"), rank=32)


@pytest.mark.parametrize(
    "command",
    [
        ["merge", "--adapters", "{R}/big_lib", "--method", "linear", "--dtype", "float32"],
        [*SCORE, "--adapter", "{R}/library/t0", "--examples", "{R}/big_score.jsonl"],
        _with(CLUSTER, "--library", "{R}/big_lib") + ["--budget", "1"],
    ],
    ids=["merge", "score", "cluster"],
)
def test_a_full_disk_is_one_line_naming_out_and_leaves_nothing(world, tmp_path, command):
    import subprocess
    import sys

    _big_library(world)
    _write_jsonl(world / "big_score.jsonl", [{"prompt": "p" * 40, "target": "t" * 40}] * 500)
    out = tmp_path / ("out.json" if command[0] == "score" else "out")
    argv = _with(_fill(command, world), "--out", str(out))
    before = tree_state(world)
    proc = subprocess.run(
        [sys.executable, "-m", "d2c_jax.cli", *argv],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        cwd=Path(__file__).resolve().parents[1],
    )
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "File too large" in errors[0], proc.stderr
    assert str(out) in errors[0] or str(tmp_path) in errors[0], errors[0]
    assert list(tmp_path.iterdir()) == [], "a partial output was left behind"
    assert tree_state(world) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_resume_of_a_read_only_out_is_refused_before_any_work(world, tmp_path, capsys):
    out = tmp_path / "out"
    argv = cluster_args(world, out, "--method", "random")
    (out / ".search").mkdir(parents=True)
    settings_of = json.loads((world / "clustered" / "manifest.json").read_text())["settings"]
    (out / ".search" / "settings.json").write_text(json.dumps(settings_of))
    for path in (out / ".search", out):
        path.chmod(0o555)
    try:
        rc, err = run_cli([*argv, "--resume"], capsys)
    finally:
        for path in (out, out / ".search"):
            path.chmod(0o755)
    assert rc == 2 and "cannot write in" in err and "Traceback" not in err


# ------------------------------------------------------------- subtle inputs


def _bom_copy(root: Path) -> None:
    """ex_bom/: the task suite with a UTF-8 byte-order mark on every file."""
    target = root / "ex_bom"
    if not target.exists():
        shutil.copytree(root / "examples", target)
        for path in target.rglob("*.jsonl"):
            path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


def test_jsonl_with_a_byte_order_mark_is_accepted(world, tmp_path):
    _bom_copy(world)
    bom = world / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (world / "score.jsonl").read_bytes())
    assert main(_fill(_with(SCORE, "--examples", str(bom)), world)) == 0
    argv = _with(
        cluster_args(world, tmp_path / "out", "--method", "random"),
        "--examples",
        str(world / "ex_bom"),
    )
    assert main(argv) == 0
    # d2c evaluate reads test.jsonl through the task suite's reader
    evaluate = [*_with(EVAL_DIR, "--tasks", "{R}/ex_bom"), "--no-relative"]
    assert main([*_fill(evaluate, world), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())
