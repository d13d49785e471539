"""The registry of named merge methods: where a merge method is defined.

A merge method is a combination of three independent choices (the decomposition
mergekit's ``merge_methods/registry.py`` uses):

* *sparsification*, applied to each adapter's task tensors once (stage 1 of
  `kernels.merge`): ``none``; ``magnitude`` (keep the top ``density`` fraction
  by |x|, TIES's trim); ``dare`` (keep each entry with probability ``density``
  and rescale by ``1 / density``);
* *sign consensus* in the combine (stage 2): ``none`` (a weighted sum) or
  ``ties`` (elect a sign per entry, sum only the agreeing entries);
* *divisor* of the combined sum: ``none`` (1), ``count`` (member count, or per
  entry the number of agreeing members under ``ties``) or ``weight`` (summed
  weights); each method has a default, `MergeConfig.divisor` overrides it.

`MERGE_METHODS` maps a name to its `MergeMethod`; `kernels.merge` dispatches on the
method's fields (never on its name), the CLI's choices and help come from it, and
docs/ARCHITECTURE.md's merge-method table is `methods_table()` (a test checks that).
Adding a method is one entry here, if it combines existing parts.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

SPARSIFICATIONS = ("none", "magnitude", "dare")
CONSENSUS = ("none", "ties")
DIVISORS = ("none", "count", "weight")


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """One named merge method.

    Attributes:
      name: the name used by `MergeConfig.method` and the ``--method`` / ``--merge`` flags.
      sparsify: "none", "magnitude" or "dare" (see the module docstring).
      consensus: "none" (weighted sum) or "ties" (sign election + disjoint sum).
      default_divisor: divisor when `MergeConfig.divisor` is None.
      summary: one line for ``--help`` and the docs table.
    """

    name: str
    sparsify: Literal["none", "magnitude", "dare"]
    consensus: Literal["none", "ties"]
    default_divisor: Literal["none", "count", "weight"]
    summary: str

    def __post_init__(self):
        for field, value, options in (
            ("sparsify", self.sparsify, SPARSIFICATIONS),
            ("consensus", self.consensus, CONSENSUS),
            ("default_divisor", self.default_divisor, DIVISORS),
        ):
            if value not in options:
                raise ValueError(f"{field} must be one of {', '.join(options)}; got {value!r}")

    @property
    def needs_density(self) -> bool:
        """Whether the method sparsifies, and so takes a ``density``."""
        return self.sparsify != "none"

    @property
    def density_interval(self) -> str:
        """The valid ``density`` values: a keep probability must be positive."""
        return "(0, 1]" if self.sparsify == "dare" else "[0, 1]"


# Default divisors are PEFT's choices except for `linear`, which is a weighted mean
# (PEFT's `linear` with weights summing to one).
MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("ties", "magnitude", "ties", "count", "trim, elect sign, disjoint mean"),
        MergeMethod("linear", "none", "none", "weight", "weighted mean"),
        MergeMethod("task_arithmetic", "none", "none", "none", "weighted sum"),
        MergeMethod("dare_ties", "dare", "ties", "count", "random drop-and-rescale, then ties"),
        MergeMethod(
            "dare_linear", "dare", "none", "none", "random drop-and-rescale, then weighted sum"
        ),
        MergeMethod("magnitude_prune", "magnitude", "none", "none", "trim, then weighted sum"),
    )
}

METHODS = tuple(MERGE_METHODS)


def get_method(name: str) -> MergeMethod:
    """The registered method called `name`; ValueError listing the choices otherwise."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {name!r}") from None


def methods_help() -> str:
    """``name: summary; ...`` for a ``--help`` text."""
    return "; ".join(f"{m.name}: {m.summary}" for m in MERGE_METHODS.values())


def methods_table() -> str:
    """The Markdown table of the registry (docs/ARCHITECTURE.md holds exactly this)."""
    rows = [
        "| method | sparsification | sign consensus | default divisor | what it does |",
        "|---|---|---|---|---|",
    ]
    rows += [
        f"| `{m.name}` | {m.sparsify} | {m.consensus} | {m.default_divisor} | {m.summary} |"
        for m in MERGE_METHODS.values()
    ]
    return "\n".join(rows) + "\n"
