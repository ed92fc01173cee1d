"""Batched optimisers of the gradient-matching attacks: Adam, a per-problem L-BFGS, and the
tracker that keeps each problem's best iterate, trace and snapshots.

Self-contained (torch only): the problems they solve are described by the protocols in
:mod:`attacks.optim.tracker`, which :mod:`attacks.matching.objective` provides.
"""
