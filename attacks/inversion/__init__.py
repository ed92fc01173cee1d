"""Network inversion: the attack (:mod:`.attack`), its conditional generator (:mod:`.generator`)
and its loss terms (:mod:`.losses`, the inversion-loss registry's built-ins). Importing this
package registers "inversion" and every loss term."""

from attacks.inversion import attack, losses

__all__ = ["attack", "losses"]
