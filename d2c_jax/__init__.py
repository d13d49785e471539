"""d2c-jax: compress a library of LoRA adapters into K merged multi-task adapters.

Importing the package sets two process-wide defaults for JAX on CPU.

OpenBLAS runs one thread unless the user chose a count (``OPENBLAS_NUM_THREADS``).
jaxlib's CPU eigh and SVD (used to truncate merged deltas back to rank r) call
LAPACK through SciPy's OpenBLAS, whose spinning worker threads collapse when the
cores are busy: a batch of 30 eigendecompositions of 576x576 took 43.5 s with the
default threads and 1.4 s with one on this 2-core machine under load. XLA's own
matmuls use XLA's thread pool and are unaffected. The setting takes effect for
libraries loaded after this import (import d2c_jax before jax or scipy to be sure).

XLA:CPU's asynchronous dispatch is turned off (see the comment below).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402  (after the environment above, which must precede SciPy/NumPy)

# XLA:CPU's asynchronous dispatch can lose a completion and hang a process forever
# (jax-ml/jax#25861). It happened here in `make demo`: after the D2C search, fetching
# a merged adapter waited on a buffer that no thread was computing. Computations
# run inline instead; on CPU the overlap it gave is small next to the kernels.
jax.config.update("jax_cpu_enable_async_dispatch", False)
