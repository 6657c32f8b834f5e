"""Experiments, one module per paper figure or table: ``experiments/<paper>/<name>.py`` defines
``EXPERIMENT`` (a `bnlab.lab.registry.Experiment`) and is found by `registry.all_experiments`
as ``<paper>.<name>``. To add one, copy the shape of ``ioffe2015/fig1.py``: a docstring (figure,
claim, paper numbers, runtime here, command), a frozen config dataclass with ``smoke``,
``quick`` and ``paper`` presets, ``variants``, ``run`` (trains through `train.fit`, attaching
probes) and ``report`` (reads run dirs only).

Papers (section numbers refer to these versions):
    [ioffe2015] S. Ioffe, C. Szegedy. Batch Normalization: Accelerating Deep Network Training by
        Reducing Internal Covariate Shift. ICML 2015, arXiv:1502.03167v3.
    [santurkar2018] S. Santurkar, D. Tsipras, A. Ilyas, A. Madry. How Does Batch Normalization
        Help Optimization? NeurIPS 2018, arXiv:1805.11604v3.
"""

CITATIONS = {
    "ioffe2015": "S. Ioffe, C. Szegedy. Batch Normalization: Accelerating Deep Network Training "
                 "by Reducing Internal Covariate Shift. ICML 2015, arXiv:1502.03167v3.",
    "santurkar2018": "S. Santurkar, D. Tsipras, A. Ilyas, A. Madry. How Does Batch Normalization "
                     "Help Optimization? NeurIPS 2018, arXiv:1805.11604v3.",
}
