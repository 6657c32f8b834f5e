"""Diagnostics that run on any `nn.Module` and training loop (imports core and torch only).

* `ActivationTracker`, `distribution_shift`, `saturation_fraction`: activation distributions
  over training (Santurkar et al. 2018, Figs. 1c, 2, 8; Ioffe & Szegedy 2015, Fig. 1b/c).
* `gradient_ics`: internal covariate shift as the change of a layer's gradient when the earlier
  layers take their update (Santurkar et al. 2018, Def. 2.1, Fig. 3).
* `landscape_probe`: loss range, gradient predictiveness and effective β-smoothness along the
  gradient (Santurkar et al. 2018, Sec. 3.2, Fig. 4).
* `layer_jacobian_singular_values`: singular values of the Jacobian between consecutive
  normalized layers (Ioffe & Szegedy 2015, Sec. 3.3's conjecture); `spectrum_summary` (or
  `JacobianResult.summary`) says how close they are to 1.

No probe changes weights, ``.grad``, optimizer state, buffers (BN running statistics) or RNG
states. Plotting lives in `bnlab.lab`.
"""

from bnlab.diagnostics._common import probing
from bnlab.diagnostics.activations import (
    NONLINEARITIES,
    ActivationTracker,
    distribution_shift,
    saturation_fraction,
)
from bnlab.diagnostics.ics import (
    LAYER_KINDS,
    NORM_KINDS,
    ICSResult,
    default_layers,
    gradient_ics,
    sgd_update,
)
from bnlab.diagnostics.jacobian import (
    JacobianResult,
    layer_jacobian_singular_values,
    layer_jacobians,
    spectrum_summary,
)
from bnlab.diagnostics.landscape import LandscapeResult, landscape_probe

__all__ = [
    "LAYER_KINDS",
    "NONLINEARITIES",
    "NORM_KINDS",
    "ActivationTracker",
    "ICSResult",
    "JacobianResult",
    "LandscapeResult",
    "default_layers",
    "distribution_shift",
    "gradient_ics",
    "landscape_probe",
    "layer_jacobian_singular_values",
    "layer_jacobians",
    "probing",
    "saturation_fraction",
    "sgd_update",
    "spectrum_summary",
]
