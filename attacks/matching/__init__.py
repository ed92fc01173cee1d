"""Optimisation-based gradient matching: dlg, idlg and inverting-gradients (:mod:`.attacks`) on
one batched problem (:mod:`.objective`), and fedavg-multistep (:mod:`.multistep`) for FedAvg
updates. Importing this package registers them."""

from attacks.matching import attacks, multistep

__all__ = ["attacks", "multistep"]
