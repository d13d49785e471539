"""The registry of named merge methods: where a merge method is defined.

A merge method is a combination of independent choices (the decomposition
mergekit's ``merge_methods/registry.py`` uses, plus a subspace):

* *subspace* (``none`` for the task-arithmetic family): ``tsv`` (TSV-M, task
  singular vectors), ``iso_c`` / ``iso_cts`` (isotropic spectrum in the common,
  or common and task-specific, subspace) and ``knots`` (KnOTS: align the members
  in the SVD of their concatenated deltas and merge the per-task coefficients).
  These need every member's whole matrix at once, so they run in delta space
  only and return a dense delta per module and layer that goes through the usual
  truncation back to rank r (a merged adapter still costs one rank-r LoRA);
  `kernels.merge` says what each keeps;
* *sparsification*, applied to each adapter's task tensors once (stage 1 of
  `kernels.merge`; for ``knots``, to each member's coefficients in the aligned
  basis instead): ``none``; ``magnitude`` (keep the top ``density`` fraction
  by |x|, TIES's trim); ``dare`` (keep each entry with probability ``density``
  and rescale by ``1 / density``); ``della`` (DELLA's MagPrune, mergekit
  ``della_magprune``: keep entry j of a row with probability
  ``density - epsilon + 2 epsilon (rank_j - 1) / (n - 1)``, ranks ascending by
  |x| within the row, then rescale the matrix to its L1 norm); ``breadcrumbs``
  (Model Breadcrumbs, mergekit ``magnitude_outliers``: drop the largest ``gamma``
  fraction by |x| and keep the next ``density`` fraction);
* *sign consensus* in the combine (stage 2): ``none`` (a weighted sum) or
  ``ties`` (elect a sign per entry, sum only the agreeing entries);
* *divisor* of the combined sum: ``none`` (1), ``count`` (member count, or per
  entry the number of agreeing members under ``ties``) or ``weight`` (summed
  weights); each method has a default, `MergeConfig.divisor` overrides it.

`MERGE_METHODS` maps a name to its `MergeMethod`; `kernels.merge` dispatches on the
method's fields (never on its name), the CLI's choices and help come from it, and
docs/ARCHITECTURE.md's merge-method table is `methods_table()` (a test checks that).
Adding a method is one entry here, if it combines existing parts. A method's extra
parameters (``gamma``, ``epsilon``, ``common_fraction``, ``sv_fraction``) are declared
in `MergeMethod.params`; `MergeConfig` fills in their defaults (`PARAM_DEFAULTS`) and
refuses them for methods that do not read them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

SPARSIFICATIONS = ("none", "magnitude", "dare", "della", "breadcrumbs")
CONSENSUS = ("none", "ties")
DIVISORS = ("none", "count", "weight")
SUBSPACES = ("none", "tsv", "iso_c", "iso_cts", "knots")

# Defaults of the extra parameters: gamma 0.01 and epsilon 0.15 are mergekit's
# (breadcrumbs' outlier fraction, DELLA's probability spread), common_fraction 0.8 is
# FusionBench's Iso-CTS default; sv_fraction None means TSV-M's 1 / (member count).
PARAM_DEFAULTS = {"gamma": 0.01, "epsilon": 0.15, "common_fraction": 0.8, "sv_fraction": None}

# Which extra parameters each sparsification / subspace reads.
_PARAMS_OF = {"breadcrumbs": ("gamma",), "della": ("epsilon",)}
_PARAMS_OF_SUBSPACE = {"tsv": ("sv_fraction",), "iso_cts": ("common_fraction",)}


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """One named merge method.

    Attributes:
      name: the name used by `MergeConfig.method` and the ``--method`` / ``--merge`` flags.
      sparsify: one of `SPARSIFICATIONS` (see the module docstring).
      consensus: "none" (weighted sum) or "ties" (sign election + disjoint sum).
      default_divisor: divisor when `MergeConfig.divisor` is None.
      summary: one line for ``--help`` and the docs table.
      subspace: one of `SUBSPACES`; "none" for the task-arithmetic family. TSV-M and
        Iso take no sparsification, consensus or divisor (all "none"); KnOTS applies
        its sparsification and consensus to the aligned coefficients.
    """

    name: str
    sparsify: Literal["none", "magnitude", "dare", "della", "breadcrumbs"]
    consensus: Literal["none", "ties"]
    default_divisor: Literal["none", "count", "weight"]
    summary: str
    subspace: Literal["none", "tsv", "iso_c", "iso_cts", "knots"] = "none"

    def __post_init__(self):
        for field, value, options in (
            ("sparsify", self.sparsify, SPARSIFICATIONS),
            ("consensus", self.consensus, CONSENSUS),
            ("default_divisor", self.default_divisor, DIVISORS),
            ("subspace", self.subspace, SUBSPACES),
        ):
            if value not in options:
                raise ValueError(f"{field} must be one of {', '.join(options)}; got {value!r}")
        if self.subspace in ("tsv", "iso_c", "iso_cts") and (
            self.sparsify,
            self.consensus,
            self.default_divisor,
        ) != ("none", "none", "none"):
            raise ValueError(f"subspace {self.subspace!r} takes no sparsify, consensus or divisor")
        if self.subspace == "knots" and self.sparsify not in ("none", "magnitude"):
            raise ValueError("knots sparsifies its coefficients by magnitude or not at all")

    @property
    def params(self) -> tuple[str, ...]:
        """The extra `MergeConfig` parameters the method reads (see `PARAM_DEFAULTS`)."""
        return _PARAMS_OF.get(self.sparsify, ()) + _PARAMS_OF_SUBSPACE.get(self.subspace, ())

    @property
    def is_subspace(self) -> bool:
        """Whether the method merges in a subspace of the members' whole matrices."""
        return self.subspace != "none"

    @property
    def needs_density(self) -> bool:
        """Whether the method sparsifies, and so takes a ``density``."""
        return self.sparsify != "none"

    @property
    def density_interval(self) -> str:
        """The valid ``density`` values: a keep probability must be positive."""
        return "(0, 1]" if self.sparsify in ("dare", "della") else "[0, 1]"


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
        # mergekit's defaults: della normalizes (divides by the agreeing weights),
        # della_linear and both breadcrumbs methods do not.
        MergeMethod(
            "della", "della", "ties", "weight", "magnitude-ranked random drop, rescale, then ties"
        ),
        MergeMethod(
            "della_linear",
            "della",
            "none",
            "none",
            "magnitude-ranked random drop, rescale, then weighted sum",
        ),
        MergeMethod(
            "breadcrumbs",
            "breadcrumbs",
            "none",
            "none",
            "drop the largest gamma and smallest entries, then weighted sum",
        ),
        MergeMethod(
            "breadcrumbs_ties",
            "breadcrumbs",
            "ties",
            "none",
            "drop the largest gamma and smallest entries, then ties",
        ),
        MergeMethod(
            "tsvm",
            "none",
            "none",
            "none",
            "task singular vectors: top 1/T of each member's SVD, orthogonalised, summed; "
            "dense delta truncated to rank r",
            subspace="tsv",
        ),
        MergeMethod(
            "iso_c",
            "none",
            "none",
            "none",
            "SVD of the sum, singular values replaced by their mean; top-r directions kept",
            subspace="iso_c",
        ),
        MergeMethod(
            "iso_cts",
            "none",
            "none",
            "none",
            "iso_c in the common subspace plus each member's own subspace; dense delta "
            "truncated to rank r",
            subspace="iso_cts",
        ),
        MergeMethod(
            "knots_ties",
            "magnitude",
            "ties",
            "count",
            "align in the SVD of the concatenated deltas, ties on the coefficients; dense "
            "delta truncated to rank r",
            subspace="knots",
        ),
        MergeMethod(
            "knots_linear",
            "none",
            "none",
            "weight",
            "align in the SVD of the concatenated deltas, weighted mean of the coefficients "
            "(equals linear); dense delta truncated to rank r",
            subspace="knots",
        ),
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
        "| method | subspace | sparsification | sign consensus | default divisor | parameters "
        "| what it does |",
        "|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| `{m.name}` | {m.subspace} | {m.sparsify} | {m.consensus} | {m.default_divisor} "
        f"| {', '.join(m.params) or '-'} | {m.summary} |"
        for m in MERGE_METHODS.values()
    ]
    return "\n".join(rows) + "\n"
