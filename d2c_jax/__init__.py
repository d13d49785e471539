"""d2c-jax: compress a library of LoRA adapters into K merged multi-task adapters.

Importing the package sets three process-wide defaults, each only where the user
has not chosen otherwise: two for JAX on CPU, and transformers' log level.

transformers logs at ``error`` only (``TRANSFORMERS_VERBOSITY``): the engine uses it
for tokenizers and config parsing only, and without torch every command would start
with its "PyTorch was not found" notice.

OpenBLAS runs one thread (``OPENBLAS_NUM_THREADS``). jaxlib's CPU eigh and SVD
(used to truncate merged deltas back to rank r) call LAPACK through SciPy's
OpenBLAS, whose spinning worker threads collapse when the cores are busy: a batch
of 30 eigendecompositions of 576x576 took 43.5 s with the default threads and
1.4 s with one on this 2-core machine under load. XLA's own matmuls use XLA's
thread pool and are unaffected.

XLA:CPU's concurrency-optimized scheduler is turned off
(``--xla_cpu_enable_concurrency_optimized_scheduler=false`` in ``XLA_FLAGS``).
With it on (the default of jaxlib 0.10), a jitted program that truncates two
merged modules to rank r, i.e. two independent batched eigendecompositions plus
matmuls, hangs forever in its first few executions: the caller waits on a result
that no thread of XLA's pool is computing (all idle, 0% CPU). `make demo` hung
in it after every clustering method in turn. With the flag the same program ran
25 times in a row; `tests/test_package.py` keeps a subprocess check of it.

Both take effect for libraries loaded and backends created after this import:
import d2c_jax before running any JAX computation (and before SciPy/NumPy for
the OpenBLAS setting).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}=false".strip()
