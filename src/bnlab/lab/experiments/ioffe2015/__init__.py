"""Ioffe & Szegedy 2015 (arXiv:1502.03167v3): Sec. 4.1 (Figure 1, the MNIST MLP), Sec. 4.2
(Figures 2–3, BN-Inception and the learning-rate study; Sec. 4.2.3, the ensemble) and Alg. 2
(inference statistics). MNIST and ImageNet are replaced by Fashion-MNIST (offline).

Shared here: the substitution text and the verdict helper used by every module's report.
"""

from __future__ import annotations

SUBSTITUTION_MNIST = (
    "Fashion-MNIST (60k/10k, 28×28, 10 classes; Debian `dataset-fashion-mnist`) stands in for "
    "MNIST. It is harder: absolute accuracies are ~8–15 points lower than the paper's MNIST "
    "numbers (the binarized Figure 1 MLP tops out near 0.83 against the paper's 0.97–0.98), so "
    "compare orderings and gaps, not levels.")
SUBSTITUTION_IMAGENET = (
    "Fashion-MNIST (28×28 grey, 10 classes, 60k training images) stands in for ImageNet (224×224 "
    "colour, 1000 classes, 1.2M images); a small Inception-style network (~0.1M parameters) for "
    "BN-Inception (13.6M); thousands of steps for millions; no photometric distortions. "
    "Learning rates are ours (chosen by a sweep), the paper's multipliers (×5, ×30) are kept.")
