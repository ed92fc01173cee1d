"""Actively malicious attacks: the server manipulates the model it sends (see :mod:`.base`).

Importing this package registers them: ``imprint`` (an added block that bins the inputs),
``trap-weights`` (a re-drawn first layer whose neurons fire rarely) and ``client-separation``
(disjoint imprint bins per client, read out of a secure aggregate).
"""

from attacks.active import imprint, separation, trap_weights

__all__ = ["imprint", "separation", "trap_weights"]
