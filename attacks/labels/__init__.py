"""Label inference from the last layer: the rules (:mod:`.recovery`), which the gradient-matching
attacks use first, and the label-counts attack that reports them (:mod:`.counts`). Importing
this package registers label-counts."""

from attacks.labels import counts

__all__ = ["counts"]
