"""A one-minute tour of the core that prints numbers a user can check (run by `make demo`).

1. bnlab.BatchNorm2d against torch.nn.BatchNorm2d on the same state_dict (train and eval).
2. Alg. 2 population statistics versus the moving average on a small conv net.
3. Folding that net for inference: no BN left, max difference before/after.
"""

from __future__ import annotations

import torch
from torch import nn

import bnlab


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), bnlab.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), bnlab.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10, bias=False),
        bnlab.BatchNorm1d(10),
    )


def main() -> None:
    torch.manual_seed(0)
    ref, ours = nn.BatchNorm2d(8), bnlab.BatchNorm2d(8)
    ours.load_state_dict(ref.state_dict())
    diffs = []
    for _ in range(5):
        x = torch.randn(16, 8, 12, 12) * 3 + 1
        diffs.append((ours(x) - ref(x)).abs().max().item())
    ours.eval()
    ref.eval()
    x = torch.randn(4, 8, 12, 12)
    var_diff = (ours.state_dict()["running_var"] - ref.state_dict()["running_var"]).abs().max()
    print(f"1. drop-in: max |bnlab - torch| over 5 training steps {max(diffs):.2e}, "
          f"running_var diff {var_diff:.2e}, eval diff {(ours(x) - ref(x)).abs().max():.2e}")

    net = _net()
    batches = [torch.randn(32, 1, 16, 16) * 2 + 0.5 for _ in range(20)]
    with torch.no_grad():
        for b in batches:  # a few "training" forwards fill the moving averages
            net(b)
    bn1 = net.get_submodule("1")
    assert isinstance(bn1, bnlab.BatchNorm) and bn1.running_var is not None  # as _net builds it
    ema = bn1.running_var.clone()
    stats = bnlab.recalibrate(net, batches)
    print(f"2. Alg. 2: layer 1 Var[x] = m/(m-1)·E_B[σ²_B] over {stats['1'].batches} batches "
          f"of m' = {stats['1'].count // stats['1'].batches} values; mean |EMA - Alg.2| of "
          f"running_var = {(ema - bn1.running_var).abs().mean():.3e}")

    net.eval()
    folded = bnlab.fold(net)
    x = torch.randn(64, 1, 16, 16)
    with torch.no_grad():
        y, yf = net(x), folded(x)
    n_bn = sum(isinstance(m, bnlab.BatchNorm) for m in folded.modules())
    print(f"3. fold: BN modules before {sum(isinstance(m, bnlab.BatchNorm) for m in net.modules())}"
          f", after {n_bn}; max |before - after| = {(y - yf).abs().max():.2e} "
          f"(relative {((y - yf).abs().max() / y.abs().max()):.2e})")


if __name__ == "__main__":
    main()
