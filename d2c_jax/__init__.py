"""d2c-jax: compress a library of LoRA adapters into K merged multi-task adapters.

Importing the package limits OpenBLAS to one thread unless the user chose a count
(``OPENBLAS_NUM_THREADS``). jaxlib's CPU eigh and SVD (used to truncate merged
deltas back to rank r) call LAPACK through SciPy's OpenBLAS, whose spinning
worker threads collapse when the cores are busy: a batch of 30 eigendecompositions
of 576x576 took 43.5 s with the default threads and 1.4 s with one on this 2-core
machine under load. XLA's own matmuls use XLA's thread pool and are unaffected.
The setting takes effect for libraries loaded after this import (import d2c_jax
before jax or scipy to be sure).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
