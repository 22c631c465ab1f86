"""Plain float64 PyTorch references that the tests and benchmarks trust.

Written for clarity, not memory: they materialise the full softmax in float64. The entropy
uses the cancellation-free form H = log1p(rest) + Σ_v p̃_v (m - s_v) / (1 + rest), with
p̃_v = e^(s_v - m) and rest = Σ_{v ≠ argmax} p̃_v: the naive -Σ p log p loses the argmax term
in float64 as well once rest < 1e-16.
"""

from __future__ import annotations

import torch


def _scaled_float64(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(temperature, dtype=torch.float64, device=logits.device)
    if t.dim():
        t = t.expand(logits.shape[:-1])[..., None]
    return logits.to(torch.float64) / t


def _row_terms(s: torch.Tensor):
    row_max, argmax = s.max(-1, keepdim=True)
    gap = torch.where(torch.isinf(s), torch.full_like(s, float("inf")), row_max - s)
    weights = torch.exp(-gap)
    rest = weights.scatter(-1, argmax, 0.0).sum(-1)
    spread = torch.where(weights > 0, weights * gap, torch.zeros_like(s)).sum(-1)
    return row_max[..., 0], rest, spread


def reference_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor | None,
                                   temperature: float | torch.Tensor = 1.0,
                                   ignore_index: int = -100
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, H) in float64: log softmax(z/T)[y] (0 where ignored) and the Shannon entropy."""
    s = _scaled_float64(logits, temperature)
    row_max, rest, spread = _row_terms(s)
    entropy = torch.log1p(rest) + spread / (1.0 + rest)
    if labels is None:
        return torch.zeros_like(entropy), entropy
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels).to(torch.int64)
    logp = (s.gather(-1, safe[..., None])[..., 0] - row_max) - torch.log1p(rest)
    return torch.where(ignored, torch.zeros_like(logp), logp), entropy


def reference_logits_grad(logits: torch.Tensor, labels: torch.Tensor | None,
                          grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                          temperature: float | torch.Tensor = 1.0,
                          ignore_index: int = -100) -> torch.Tensor:
    """∂L/∂z in float64 from the closed forms
    ∂logp/∂z_v = (1[v=y] - p_v)/T and ∂H/∂z_v = -p_v (log p_v + H)/T."""
    s = _scaled_float64(logits, temperature)
    t = torch.as_tensor(temperature, dtype=torch.float64, device=logits.device)
    inv_t = (1.0 / t.expand(logits.shape[:-1]))[..., None] if t.dim() else 1.0 / t
    log_p = torch.log_softmax(s, dim=-1)
    p = log_p.exp()
    grad = torch.zeros_like(s)
    if grad_entropy is not None:
        _, entropy = reference_logprobs_and_entropy(logits, None, temperature)
        term = torch.where(p > 0, p * (log_p + entropy[..., None]), torch.zeros_like(p))
        grad -= grad_entropy.to(torch.float64)[..., None] * term
    if grad_logp is not None and labels is not None:
        ignored = labels == ignore_index
        g = torch.where(ignored, torch.zeros_like(grad_logp), grad_logp).to(torch.float64)
        safe = torch.where(ignored, torch.zeros_like(labels), labels).to(torch.int64)
        grad -= g[..., None] * p
        grad.scatter_add_(-1, safe[..., None], g[..., None])
    return grad * inv_t
