"""Shared fixtures: deterministic seeds and the edge-case table of shapes (aesthetics C3.7)."""

from __future__ import annotations

import socket

import pytest
import torch

# (N, C, *) shapes of every rank BN accepts, with C = 1 and N = 1 (spatial > 1) among them.
SHAPES = [(8, 3), (1, 1, 7), (5, 4, 6), (4, 3, 5, 6), (1, 2, 3, 3), (2, 3, 2, 3, 4), (6, 1)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def layer_pair(ndim: int, c: int, **kw):
    """(bnlab layer, torch layer) of the class matching an input of rank ndim, same init."""
    import bnlab

    ours_cls = {2: bnlab.BatchNorm1d, 3: bnlab.BatchNorm1d, 4: bnlab.BatchNorm2d,
                5: bnlab.BatchNorm3d}[ndim]
    ref_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}[ndim]
    ours, ref = ours_cls(c, **kw), ref_cls(c, **kw)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the 2-process gloo tests' MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
