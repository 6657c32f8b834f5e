"""bnlab.lab: reproduces Ioffe & Szegedy 2015 (and, later, Santurkar et al. 2018) from one
command each.

`data` (IDX data sets as tensors), `models`, `train` (the shared loop; probes attach to it),
`runs` (run directories), `config` (frozen dataclasses, ``--set``), `registry` (experiment
discovery and the runner), `plots` and `report` (read run directories only), and the
experiments under `experiments/<paper>/`. Nothing heavy is imported here.
"""
