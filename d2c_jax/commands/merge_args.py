"""Command-line flags of a merge, shared by every command that merges.

``d2c merge``, ``d2c cluster`` and ``d2c evaluate`` register the same flags with
`add_merge_arguments` and turn them into a `kernels.merge.MergeConfig` with
`merge_config_from_args`; the method choices and their help come from the registry
`kernels.merge_methods.MERGE_METHODS`, so a method added there shows up here.
"""

from __future__ import annotations

import argparse

from kernels import merge as kmerge
from kernels.merge import MergeConfig
from kernels.merge_methods import MERGE_METHODS, METHODS, get_method, methods_help


def _default_divisors() -> str:
    """``count for ties, dare_ties; weight for linear; ...`` from the registry."""
    by_divisor: dict[str, list[str]] = {}
    for m in MERGE_METHODS.values():
        by_divisor.setdefault(m.default_divisor, []).append(m.name)
    return "; ".join(f"{d} for {', '.join(names)}" for d, names in by_divisor.items())


def add_merge_arguments(
    parser: argparse.ArgumentParser, method_flag: str = "--method", seed_help: str | None = None
) -> None:
    """Register the flags that define a merge (shared by every command that merges).

    The merge method's flag is `method_flag` (``d2c cluster`` uses ``--merge``, its
    ``--method`` being the clustering method); its value lands in
    ``args.merge_method`` either way. ``seed_help`` replaces the help of ``--seed``
    (a command whose seed also seeds something else says so).
    """
    from d2c_jax.commands.checks import finite_float, fraction, nonnegative_int

    group = parser.add_argument_group(
        "merge", "how adapters are merged (see kernels/merge.py for exact semantics)"
    )
    group.add_argument(
        method_flag,
        dest="merge_method",
        choices=METHODS,
        default="ties",
        help=methods_help() + " (default: %(default)s)",
    )
    group.add_argument(
        "--space",
        choices=kmerge.SPACES,
        default="delta",
        help="delta: merge dense scale*B@A per module and truncate back to rank r by SVD; "
        "factor: merge A and B separately like PEFT add_weighted_adapter (cheap, has "
        "cross-term defects) (default: %(default)s)",
    )
    group.add_argument(
        "--density",
        type=fraction,
        default=None,
        help="fraction of entries kept, in (0, 1]: top-|x| for ties and magnitude_prune, "
        "keep probability for dare_*; required by those methods, not accepted by linear / "
        "task_arithmetic (the TIES paper uses 0.2)",
    )
    group.add_argument(
        "--weights",
        type=finite_float,
        nargs="+",
        default=None,
        metavar="W",
        help="one weight per adapter, in library order (default: all 1)",
    )
    group.add_argument(
        "--trim",
        choices=kmerge.TRIMS,
        default="per-tensor",
        help="magnitude-trim scope: each module-layer matrix (PEFT, mergekit) or per adapter "
        "over all modules and layers (TIES paper code) (default: %(default)s)",
    )
    group.add_argument(
        "--majority",
        choices=kmerge.MAJORITIES,
        default="total",
        help="TIES sign election: sign of the summed values or of the count of signs "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--sign-vote",
        choices=kmerge.SIGN_VOTES,
        default="unweighted",
        help="TIES votes on values before (PEFT) or after (mergekit) multiplying by the "
        "weights (default: %(default)s)",
    )
    group.add_argument(
        "--divisor",
        choices=kmerge.DIVISORS,
        default=None,
        help="weighted-sum methods divide each cluster by 1, its member count or its summed "
        "weights; TIES divides each entry by 1, its number of agreeing members or their summed "
        f"weights (default: {_default_divisors()})",
    )
    group.add_argument(
        "--lambda",
        dest="lam",
        type=finite_float,
        default=1.0,
        metavar="L",
        help="multiplies the merged task vector (default: %(default)s)",
    )
    group.add_argument(
        "--singletons",
        choices=kmerge.SINGLETONS,
        default="keep",
        help="keep: a one-adapter cluster is that adapter, unchanged (PEFT); merge: it is "
        "merged like any cluster, e.g. trimmed by TIES (mergekit) (default: %(default)s)",
    )
    group.add_argument(
        "--gamma",
        type=fraction,
        default=None,
        help="breadcrumbs*: fraction of the largest magnitudes dropped (default: mergekit's 0.01)",
    )
    group.add_argument(
        "--epsilon",
        type=fraction,
        default=None,
        help="della*: keep probabilities run from density - epsilon (smallest |x| of a row) "
        "to density + epsilon (largest) (default: mergekit's 0.15)",
    )
    group.add_argument(
        "--common-fraction",
        type=fraction,
        default=None,
        help="iso_cts: fraction of min(d_out, d_in) given to the common subspace "
        "(default: FusionBench's 0.8)",
    )
    group.add_argument(
        "--sv-fraction",
        type=fraction,
        default=None,
        help="tsvm: fraction of min(d_out, d_in) singular vectors each member keeps, at most "
        "its rank (default: 1 / the cluster's member count, as TSV-M)",
    )
    group.add_argument(
        "--seed",
        type=nonnegative_int,  # numpy's generators refuse negative seeds, late and unnamed
        default=0,
        help=seed_help
        or "seed of DARE's and DELLA's random masks; an adapter's mask depends on the seed "
        "and its name (default: %(default)s)",
    )


def merge_config_from_args(
    args: argparse.Namespace, default_density: float | None = None
) -> MergeConfig:
    """The MergeConfig described by flags registered with `add_merge_arguments`.

    ``default_density`` fills in ``--density`` for sparsifying methods when it is not
    given (commands that merge inside a search use the TIES paper's 0.2); without
    it the flag is required for them.
    """
    method = args.merge_method
    sparsifies = get_method(method).needs_density
    density = args.density if args.density is not None or not sparsifies else default_density
    if sparsifies and density is None:
        raise ValueError(
            f"--density is required for merge method {method} (fraction of entries kept; "
            "the TIES paper uses 0.2)"
        )
    if not sparsifies and args.density is not None:
        raise ValueError(f"--density does not apply to merge method {method}; leave it out")
    try:
        return MergeConfig(
            method=method,
            space=args.space,
            density=density,
            trim=args.trim,
            majority=args.majority,
            sign_vote=args.sign_vote,
            divisor=args.divisor,
            lam=args.lam,
            weights=tuple(args.weights) if args.weights is not None else None,
            seed=args.seed,
            singletons=args.singletons,
            gamma=getattr(args, "gamma", None),
            epsilon=getattr(args, "epsilon", None),
            common_fraction=getattr(args, "common_fraction", None),
            sv_fraction=getattr(args, "sv_fraction", None),
        )
    except ValueError as err:
        raise ValueError(f"invalid merge flags: {err}") from None
