"""`d2c_jax.examples`: reading JSONL examples and encoding them per the contract."""

from __future__ import annotations

import numpy as np
import pytest

from d2c_jax.examples import EncodedExamples, ExampleError, encode_examples, read_examples


def test_read_examples_ok(tmp_path, write_jsonl):
    path = write_jsonl(
        tmp_path / "ex.jsonl",
        [{"prompt": "a", "target": "b", "task": "t"}, "", {"prompt": "", "target": "c"}],
    )
    ex = read_examples(path)
    assert [(e["prompt"], e["target"], e["_line"]) for e in ex] == [("a", "b", 1), ("", "c", 3)]


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"prompt": "a", "target": "b"', "ex.jsonl:2: malformed JSON"),
        ('["a", "b"]', "ex.jsonl:2: expected a JSON object"),
        ('{"prompt": "a"}', "ex.jsonl:2: missing 'target'"),
        ('{"prompt": "a", "target": 3}', "ex.jsonl:2: 'target' must be a string"),
        ('{"prompt": "a", "target": "  "}', "ex.jsonl:2: empty target"),
    ],
)
def test_read_examples_errors(tmp_path, write_jsonl, bad, message):
    path = write_jsonl(tmp_path / "ex.jsonl", [{"prompt": "x", "target": "y"}, bad])
    with pytest.raises(ExampleError, match=message):
        read_examples(path)


def test_read_examples_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "nope.jsonl")


def test_encode_follows_the_contract(tiny_base, tiny_examples):
    tok = tiny_base.tokenizer
    enc = encode_examples(tiny_base, tiny_examples)
    assert enc.tokens.dtype == np.int32 and enc.tokens.shape[1] % 16 == 0
    assert enc.task_names == ("upper", "reverse", "count")
    np.testing.assert_array_equal(enc.task_ids, np.repeat([0, 1, 2], 4))
    for i, ex in enumerate(tiny_examples):
        prompt = tok(ex["prompt"], add_special_tokens=True)["input_ids"]
        target = tok(ex["target"], add_special_tokens=False)["input_ids"]
        assert prompt[0] == 0  # document start
        seq = prompt + target + [tok.eos_token_id]
        n = len(seq)
        assert enc.lengths[i] == n
        np.testing.assert_array_equal(enc.tokens[i, :n], seq)
        want_mask = [0] * len(prompt) + [1] * (n - len(prompt))
        np.testing.assert_array_equal(enc.loss_mask[i, :n], want_mask)
        assert not enc.loss_mask[i, n:].any()


def test_encode_errors(tiny_base):
    with pytest.raises(ExampleError, match="example 1 .line 7.: empty target"):
        encode_examples(
            tiny_base, [{"prompt": "a", "target": "b"}, {"prompt": "a", "target": "", "_line": 7}]
        )
    long = {"prompt": "x" * 300, "target": "y", "_line": 3}
    with pytest.raises(ExampleError, match=r"example 0 \(line 3\): 303 tokens .* context of 256"):
        encode_examples(tiny_base, [long])
    with pytest.raises(ExampleError, match="context of 10"):
        encode_examples(
            tiny_base.tokenizer, [{"prompt": "abcdefghij", "target": "k"}], max_length=10
        )


def test_encoded_examples_minimal_constructor():
    tokens = np.array([[0, 5, 6, 2, 2]], np.int32)
    mask = np.array([[0, 0, 1, 1, 0]], np.float32)
    enc = EncodedExamples(tokens=tokens, loss_mask=mask)
    assert enc.lengths.tolist() == [4] and enc.num_labels.tolist() == [2]
