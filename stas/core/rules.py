"""STAS steering rules: pure tensor functions shared by `apply_rule` and the in-place steering hook.

At steered tokens and channels the hidden state moves toward a target: out = h + strength * (target - h).
  max_scaled       target = alpha * M_b * sign(h), M_b the largest |h| over all tokens and steered channels of b
  per_channel_max  target = alpha * M_bd * sign(h), M_bd the largest |h| of channel d over all tokens of b
  scale            target = alpha * h
  zero             target = 0
"""

from __future__ import annotations

import torch

from stas.core.massive import channel_peaks

RULES = ("max_scaled", "per_channel_max", "scale", "zero")
RULES_WITH_ALPHA = ("max_scaled", "per_channel_max", "scale")


def check_rule(rule: str, alpha: float, strength: float) -> None:
    """Raise ValueError naming the field when a rule, alpha or strength is not allowed."""
    if rule not in RULES:
        raise ValueError(f"steer.rule={rule!r} is not a rule; allowed: {', '.join(RULES)}")
    if rule in RULES_WITH_ALPHA and not alpha > 0:
        raise ValueError(f"steer.alpha={alpha!r} must be > 0 for rule {rule!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"steer.strength={strength!r} must lie in [0, 1]")


def reference_magnitude(peaks: torch.Tensor, steered: torch.Tensor, rule: str) -> torch.Tensor | None:
    """Reference magnitude M for the rule, broadcastable against (B, S, C) values.

    `peaks` (B, C) are per-channel peaks over all tokens of each batch element, `steered` (C,) or (B, C) tells which
    of those C channels are steered. Returns (B, 1, 1) for max_scaled, (B, 1, C) for per_channel_max, None otherwise.
    """
    if rule == "max_scaled":
        return (peaks * steered).amax(dim=-1)[:, None, None]
    if rule == "per_channel_max":
        return peaks[:, None, :]
    return None


def steered_values(values: torch.Tensor, reference: torch.Tensor | None, rule: str, alpha: float, strength: float):
    """h + strength * (target - h) for every element of `values`; `reference` from `reference_magnitude`."""
    if rule == "zero":
        target = torch.zeros_like(values)
    elif rule == "scale":
        target = values * alpha
    else:
        target = torch.sign(values) * (reference * alpha)
    return torch.lerp(values, target.to(values.dtype), strength)


def apply_rule(hidden, token_mask, channel_mask, rule="max_scaled", alpha=1.0, strength=1.0) -> torch.Tensor:
    """Steer `hidden` (B, S, D) at `token_mask` (S,) x `channel_mask` (D,); returns a new tensor.

    Each batch element has its own reference magnitude (see the module docstring); elements outside the masks are
    returned unchanged, bit for bit.
    """
    check_rule(rule, alpha, strength)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, S, D), got shape {tuple(hidden.shape)}")
    token_mask = token_mask.to(hidden.device)
    channel_mask = channel_mask.to(hidden.device)
    reference = reference_magnitude(channel_peaks(hidden, dim=1), channel_mask, rule)
    selected = token_mask[None, :, None] & channel_mask[None, None, :]
    return torch.where(selected, steered_values(hidden, reference, rule, alpha, strength), hidden)
