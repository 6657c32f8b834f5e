"""Fast CPU kernels for batch norm (issue 6). Until they are built, nothing is supported and
`bnlab.functional` takes the reference path."""

from __future__ import annotations

from torch import Tensor


def supports(x: Tensor) -> bool:
    """Whether a fast kernel handles this input (none yet: the reference path is used)."""
    return False
