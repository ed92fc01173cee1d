"""The malicious server's side: what it observes, the attacks it runs, and leakage metrics.

Nothing in this package may import the simulator's oracle (the clients' ground truth); a test
walks the imports to enforce it. Attacks see :class:`attacks.observation.Observation` only.
"""
