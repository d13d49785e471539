"""`d2c_jax.commands.merge_args`: the merge flags round-trip to a MergeConfig."""

from __future__ import annotations

import argparse

import pytest

from d2c_jax.commands.merge_args import add_merge_arguments, merge_config_from_args
from kernels.merge import MergeConfig
from kernels.merge_methods import METHODS


def test_merge_arguments_round_trip():
    parser = argparse.ArgumentParser()
    add_merge_arguments(parser)
    args = parser.parse_args(
        "--method dare_ties --space factor --density 0.3 --weights 1 2 --trim global "
        "--majority frequency --sign-vote weighted --lambda 0.8 --seed 4 "
        "--singletons merge".split()
    )
    config = merge_config_from_args(args)
    assert config == MergeConfig(
        "dare_ties",
        space="factor",
        density=0.3,
        weights=(1.0, 2.0),
        trim="global",
        majority="frequency",
        sign_vote="weighted",
        divisor="count",
        lam=0.8,
        seed=4,
        singletons="merge",
    )
    with pytest.raises(ValueError, match="--density is required for merge method ties"):
        merge_config_from_args(parser.parse_args(["--method", "ties"]))
    assert merge_config_from_args(parser.parse_args(["--method", "linear"])).divisor == "weight"
    renamed = argparse.ArgumentParser()
    renamed.add_argument("--method", default="kmeans")  # e.g. the clustering method
    add_merge_arguments(renamed, method_flag="--merge")
    args = renamed.parse_args(["--method", "d2c", "--merge", "linear"])
    assert args.method == "d2c" and merge_config_from_args(args).method == "linear"


def test_method_choices_and_help_come_from_the_registry():
    parser = argparse.ArgumentParser()
    add_merge_arguments(parser)
    action = next(a for a in parser._actions if a.dest == "merge_method")
    assert tuple(action.choices) == METHODS
    for name in METHODS:
        assert f"{name}:" in action.help
    divisor = next(a for a in parser._actions if a.dest == "divisor")
    assert "count for ties, dare_ties" in divisor.help and "weight for linear" in divisor.help
