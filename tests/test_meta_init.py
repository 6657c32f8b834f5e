"""Meta-device initialization, as large-model code does it: build under ``torch.device("meta")``,
then either ``to_empty()`` and ``reset_parameters()`` on every submodule that has one, or
``load_state_dict(..., assign=True)``. Either way no tensor may be left on the meta device or
hold uninitialized memory (bnlab's layers also carry a non-persistent counter,
``num_nonfinite_batches``, which no state_dict brings)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _modules import MODULES

# Lazy modules have no state before their first input; ChannelAffine is built from given
# tensors (a fold's result) and has nothing to reset to.
NAMES = sorted(n for n in MODULES if not n.startswith("Lazy") and n != "ChannelAffine")


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _input(rank: int) -> torch.Tensor:
    return torch.randn((6, 4, 3, 5, 2)[:rank]) * 2 + 1


@pytest.mark.parametrize("name", NAMES)
def test_to_empty_then_reset_parameters_equals_a_fresh_module(name):
    make, _ = MODULES[name]
    fresh = make()
    with torch.device("meta"):
        module = make()
    module.to_empty(device="cpu")
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    state, want = _state(module), _state(fresh)
    assert state.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(state[k], want[k], msg=f"{name}.{k}")


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_with_assign_leaves_nothing_on_meta(name):
    make, rank = MODULES[name]
    torch.manual_seed(0)
    source = make()
    source(_input(rank))  # trained once: non-trivial running statistics
    with torch.device("meta"):
        module = make()
    module.load_state_dict(source.state_dict(), assign=True)
    left = [k for k, t in _state(module).items() if t.is_meta]
    assert not left, f"{name}: still on the meta device: {left}"
    if hasattr(module, "num_nonfinite_batches"):
        assert int(module.num_nonfinite_batches) == 0
    module.eval()
    source.eval()
    x = _input(rank)
    torch.testing.assert_close(module(x), source(x))


@pytest.mark.parametrize("name", NAMES)
def test_to_empty_then_load_state_dict_leaves_no_uninitialized_counter(name):
    """The flow without reset_parameters: to_empty() (uninitialized memory), then a plain
    load_state_dict, which brings every persistent tensor but not the non-finite counter."""
    make, _ = MODULES[name]
    state = make().state_dict()
    with torch.device("meta"):
        module = make()
    module.to_empty(device="cpu")
    if hasattr(module, "num_nonfinite_batches"):
        module.num_nonfinite_batches.fill_(123456789)  # what to_empty's memory may hold
    module.load_state_dict(state)
    if hasattr(module, "num_nonfinite_batches"):
        assert int(module.num_nonfinite_batches) == 0
