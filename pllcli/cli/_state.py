"""Process-wide CLI settings set by the top-level callback."""
from dataclasses import dataclass


@dataclass
class Settings:
    debug: bool = False
    verbosity: int = 0  # -1 quiet, 0 normal, 1+ verbose


settings = Settings()


def one_blas_thread() -> None:
    """One OpenBLAS thread per process, unless the user set one: numpy's BLAS would split every
    clip's mel matmul over all cores and spin between them (3x the CPU time of featurize). Read
    when numpy loads, so call it before that; featurize (and predict on audio) use it."""
    import os
    import sys
    if "numpy" not in sys.modules and not (os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
