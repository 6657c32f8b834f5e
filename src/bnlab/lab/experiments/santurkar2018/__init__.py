"""Santurkar, Tsipras, Ilyas, Madry 2018. How Does Batch Normalization Help Optimization?
NeurIPS 2018, arXiv:1805.11604v3 (section and figure numbers refer to this version).

Experiments: ``fig1`` (VGG with and without BN at lr 0.1 and 0.5, layer distributions), ``fig2``
(noisy BN, Sec. 2.1 / Alg. 1), ``fig3`` (gradient ICS, Def. 2.1), ``fig4`` (loss landscape,
Sec. 3.2), ``fig5`` (ℓp normalizations, Sec. 3.3) and ``dln`` (the 25-layer deep linear network,
App. A.1). CIFAR-10 is not available offline: the VGG experiments train on Fashion-MNIST
(28×28 grey, native size; the lab's VGG handles 28 with ceil-mode pooling) with a narrower VGG
and fewer steps; each module's docstring says exactly how. Shared helpers: ``_common``.
"""
