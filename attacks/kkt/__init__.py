"""Dataset reconstruction from trained weights through the KKT conditions: the attack
(:mod:`.attack`), its batched runs and closed form (:mod:`.runs`), and which candidates it
reports without the truth (:mod:`.selection`). Importing this package registers "kkt"."""

from attacks.kkt import attack

__all__ = ["attack"]
