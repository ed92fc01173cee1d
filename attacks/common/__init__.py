"""What several attack families share: the update as a gradient and the local step count
(:mod:`.updates`), the first and last linear layers (:mod:`.layers`), image priors
(:mod:`.priors`). Imports only :mod:`simulator.core`."""
