"""Reading inputs out of the gradient of an imprint block: bins, differences, peeling.

An imprint block's encoder has chains of neurons that share one direction ``v`` and differ in
their threshold: neuron ``i`` computes ``relu(v . x - t_i)`` with ``t_0 < t_1 < ...``, so it
fires for every input whose projection exceeds ``t_i`` ("cumulative" bins). The decoder adds
the same multiple of every neuron to the image, so the loss gradient reaching neuron ``i`` from
input ``s`` is one number ``G_s`` whichever neuron it is. The encoder's gradient rows are then

    dW_i = sum over inputs s with v . x_s > t_i of G_s x_s,      db_i = sum of the same G_s,

and the differences of consecutive rows isolate one bin ``[t_i, t_{i+1})``:
``(dW_i - dW_{i+1}, db_i - db_{i+1}) = sum over inputs in bin i of G_s (x_s, 1)``. A bin with
one input gives that input exactly, ``x_s = dW / db`` (Fowl et al. 2022). With one chain, the
expected share of ``n`` inputs alone in one of ``k`` equal-mass bins is ``(1 - 1/k)^(n-1)``.

With several chains (directions) the same input sits in one bin of each, and an input found in
one chain can be subtracted from its bins in the others, ``G_s`` included (it is the same
number there): a collision of two inputs in one chain becomes a single input once the other is
known. :func:`decode` peels this way, as an erasure decoder peels a sparse code. A candidate is
accepted when it is consistent everywhere: inside the pixel box, in the bin it came from, and,
in every other chain, in a bin holding gradient mass whose remainder after subtracting it is
zero (the input was alone there too: "confirmed") or again a consistent input. Confirmed
candidates are taken first. Under FedAvg the update is a sum over local steps; the same
reasoning holds while the block's weights barely move, since each input stays in its bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chain:
    """Encoder rows sharing one direction, ordered by ascending threshold."""

    rows: torch.Tensor  # (m,) row indices into the encoder
    direction: torch.Tensor  # (d,) unit vector, float64
    thresholds: torch.Tensor  # (m,) ascending, float64

    def bin_of(self, images: torch.Tensor) -> torch.Tensor:
        """The bin index of each flat image (-1: below the first threshold)."""
        projections = images @ self.direction
        return torch.searchsorted(self.thresholds, projections.contiguous(), right=True) - 1


def chains_of(weight: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor) -> list[Chain]:
    """The chains among encoder ``rows``: rows grouped by direction (zero rows are muted)."""
    weight, bias = weight.double(), bias.double()
    norms = weight[rows].norm(dim=1)
    live = rows[norms > 0]
    units = weight[live] / norms[norms > 0, None]
    thresholds = -bias[live] / norms[norms > 0]
    chains: list[Chain] = []
    remaining = torch.ones(len(live), dtype=torch.bool)
    while bool(remaining.any()):
        first = int(remaining.nonzero()[0])
        same = remaining & ((units - units[first]).abs().amax(1) < 1e-6)
        members = same.nonzero().flatten()
        order = members[thresholds[members].argsort()]
        chains.append(Chain(live[order], units[first], thresholds[order]))
        remaining &= ~same
    return chains


@dataclass(frozen=True)
class Decoded:
    """What :func:`decode` found: flat images, which are confirmed, and how many were peeled."""

    images: torch.Tensor  # (m, d) float64, m <= n
    confirmed: torch.Tensor  # (m,) bool: seen alone in two chains
    peeled: int  # accepted by the peeling loop (the rest fill leftover slots)


def _inbox(images: torch.Tensor, slack: float) -> torch.Tensor:
    return ((images >= -slack) & (images <= 1 + slack)).all(-1)


class _Residuals:
    """Per chain, the bins' remaining ``(sum G_s x_s, sum G_s)`` as inputs are peeled off."""

    def __init__(
        self, grad_w: torch.Tensor, grad_b: torch.Tensor, chains: list[Chain], floor: float
    ) -> None:
        self.chains = chains
        self.w: list[torch.Tensor] = []
        self.b: list[torch.Tensor] = []
        for chain in chains:
            rows_w, rows_b = grad_w[chain.rows].double(), grad_b[chain.rows].double()
            self.w.append(rows_w - torch.cat([rows_w[1:], torch.zeros_like(rows_w[:1])]))
            self.b.append(rows_b - torch.cat([rows_b[1:], torch.zeros_like(rows_b[:1])]))
        scale = max((float(b.abs().max()) for b in self.b if len(b)), default=0.0)
        self.eps = floor * scale

    def candidates(self, j: int, slack: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bins of chain ``j`` with mass, their ratios, and whether each is self-consistent."""
        index = (self.b[j].abs() > self.eps).nonzero().flatten()
        gains = self.b[j][index]
        images = self.w[j][index] / gains[:, None]
        ok = _inbox(images, slack) & (self.chains[j].bin_of(images) == index)
        return index, images, ok

    def check(
        self, j: int, images: torch.Tensor, gains: torch.Tensor, slack: float, zero: float
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """For candidates of chain ``j``: consistent in every other chain, how many confirm
        them (their bin there empties), and their bin in each chain (``j``'s left as -1)."""
        ok = torch.ones(len(gains), dtype=torch.bool)
        matches = torch.zeros(len(gains), dtype=torch.int64)
        bins: list[torch.Tensor] = []
        for other, chain in enumerate(self.chains):
            if other == j:
                bins.append(torch.full_like(matches, -1))
                continue
            beta = chain.bin_of(images)
            bins.append(beta)
            safe = beta.clamp(min=0)
            mass = self.b[other][safe]
            rest_b = mass - gains
            rest_w = self.w[other][safe] - gains[:, None] * images
            limit = zero * gains.abs() + self.eps
            empties = (rest_b.abs() <= limit) & (rest_w.abs().amax(1) <= limit)
            denominator = torch.where(rest_b.abs() > self.eps, rest_b, torch.ones_like(rest_b))
            ratio = rest_w / denominator[:, None]
            single = (
                (rest_b.abs() > self.eps) & _inbox(ratio, slack) & (chain.bin_of(ratio) == beta)
            )
            ok &= (beta >= 0) & (mass.abs() > self.eps) & (empties | single)
            matches += empties.long()
        return ok, matches, bins

    def peel(self, image: torch.Tensor, gain: torch.Tensor, bins: list[int]) -> None:
        for j, index in enumerate(bins):
            self.w[j][index] -= gain * image
            self.b[j][index] -= gain


def decode(
    grad_w: torch.Tensor,
    grad_b: torch.Tensor,
    chains: list[Chain],
    n: int,
    *,
    slack: float = 0.01,
    zero: float = 1e-4,
    floor: float = 1e-5,
    tolerance: float = 1e-4,
) -> Decoded:
    """Up to ``n`` flat images from an imprint encoder's gradient (rows ``dW``, ``db``).

    ``slack``: how far outside [0, 1] a pixel may be; ``zero``: a bin's remainder counts as
    empty below this fraction of the peeled gain; ``floor``: bins with less than this fraction
    of the largest bin's mass are empty; ``tolerance``: pixel RMSE under which two candidates
    are the same input.
    """
    state = _Residuals(grad_w, grad_b, chains, floor)
    found: list[torch.Tensor] = []
    confirmed: list[bool] = []
    for _ in range(4 * n + 8):
        if len(found) >= n:
            break
        proposals: list[tuple[int, float, torch.Tensor, torch.Tensor, list[int]]] = []
        for j in range(len(chains)):
            index, images, ok = state.candidates(j, slack)
            if not bool(ok.any()):
                continue
            index, images = index[ok], images[ok]
            gains = state.b[j][index]
            valid, matches, bins = state.check(j, images, gains, slack, zero)
            for r in valid.nonzero().flatten().tolist():
                where = [int(index[r]) if o == j else int(b[r]) for o, b in enumerate(bins)]
                strength = (int(matches[r]), float(gains[r].abs()))
                proposals.append((*strength, images[r], gains[r], where))
        if not proposals:
            break
        proposals.sort(key=lambda p: (-p[0], -p[1]))
        if proposals[0][0] > 0:  # confirmed inputs first: they cannot be mixtures
            proposals = [p for p in proposals if p[0] > 0]
        taken: set[tuple[int, int]] = set()
        accepted = 0
        for matches_count, _, image, gain, where in proposals:
            touched = {(j, b) for j, b in enumerate(where)}
            if touched & taken or any(_rmse(image, f) < tolerance for f in found):
                continue
            taken |= touched
            state.peel(image, gain, where)
            found.append(image)
            confirmed.append(matches_count > 0)
            accepted += 1
            if len(found) >= n:
                break
        if not accepted:
            break
    peeled = len(found)
    for j in range(len(chains)):  # leftovers: self-consistent bins nobody could confirm
        index, images, ok = state.candidates(j, slack)
        for image in images[ok]:
            if len(found) < n and all(_rmse(image, f) >= tolerance for f in found):
                found.append(image)
                confirmed.append(False)
    dims = grad_w.shape[1]
    stacked = torch.stack(found) if found else torch.zeros(0, dims, dtype=torch.float64)
    return Decoded(stacked, torch.tensor(confirmed, dtype=torch.bool), peeled)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())
