"""variant="released" against a plain transcription of HAPO's public reference code.

The reference (verl fork of the HAPO authors) computes, per micro-batch and under no-grad:
ĥ from the current entropy (nearest-rank pivot of ln max(H, 1e-8), rescaled by the largest
deviation on each side, with the sign slip below the pivot), widened clip bounds, the
redistributed advantages with the neutral zone of the widened bounds, then the PPO loss with
dual clip c and token-mean aggregation. Written here independently, in float64, with loops.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hapo_ops


def reference_released_loss(logp, old_logp, adv, entropy, mask, *, pivot_q=0.8, eps_low=0.2,
                            eps_high=0.2, alpha=1.0, beta=1.0, c=10.0):
    rows, cols = len(logp), len(logp[0])
    valid = [(i, t) for i in range(rows) for t in range(cols) if mask[i][t]]
    ell = [[math.log(max(entropy[i][t], 1e-8)) for t in range(cols)] for i in range(rows)]
    pooled = sorted(ell[i][t] for i, t in valid)
    pivot = pooled[round(pivot_q * (len(pooled) - 1))]
    above = [ell[i][t] - pivot for i, t in valid if ell[i][t] > pivot]
    below = [ell[i][t] - pivot for i, t in valid if ell[i][t] < pivot]
    pos_max = max(max(above, default=0.0), 1e-8)
    neg_min = min(min(below, default=0.0), -1e-8)
    total, count = 0.0, 0
    for i, t in valid:
        h = ell[i][t] - pivot
        h_hat = h / pos_max if h > 0 else h / neg_min          # ≥ 0 on both sides
        lo = eps_low * (1 - alpha * h_hat) if h_hat <= 0 else eps_low
        hi = eps_high * (1 + alpha * h_hat) if h_hat > 0 else eps_high
        r = math.exp(logp[i][t] - old_logp[i][t])
        inside = 1 - lo / 2 < r < 1 + hi / 2
        a = adv[i][t]
        if (h_hat > 0 and not inside) or (h_hat <= 0 and inside):
            a = a * (1 + beta * h_hat)
        loss = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
        if a < 0:
            loss = min(loss, -a * c)
        total += loss
        count += 1
    return total / max(count, 1)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 9), seed=st.integers(0, 2**31 - 1),
       spread=st.sampled_from([0.05, 0.3, 1.5]))
def test_released_variant_reproduces_reference_loss(rows, cols, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 3
    logp = old + torch.randn(rows, cols, generator=gen, dtype=torch.float64) * spread
    adv = torch.randn(rows, 1, generator=gen, dtype=torch.float64).expand(rows, cols).clone()
    entropy = torch.exp(torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 4 - 4)
    mask = torch.rand(rows, cols, generator=gen) < 0.8
    mask[0, 0] = True
    out = hapo_ops.hapo_policy_loss(logp, old, adv, entropy, mask, variant="released")
    expected = reference_released_loss(logp.tolist(), old.tolist(), adv.tolist(),
                                       entropy.tolist(), mask.tolist())
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-5, abs_tol=1e-6)
