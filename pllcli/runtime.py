"""Device, seed and thread helpers shared by the torch stages."""
from __future__ import annotations

import os
import random

from pllcli.errors import UsageError


def resolve_device(spec: str = "auto"):
    """'auto' -> cuda if available else cpu; validates explicit cuda requests."""
    import torch
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None


def set_seed(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_torch_threads(n: int | None) -> None:
    """Limit intra-op threads (workers use 1 each so that N jobs use N cores)."""
    import torch
    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
