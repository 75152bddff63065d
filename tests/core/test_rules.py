"""massive_channel_mask and apply_rule on synthetic hidden states with planted MA channels."""

import pytest
import torch

from stas.core.massive import DETECTION_RULES, Detection, channel_peaks, detect_massive, massive_channel_mask
from stas.core.rules import RULES, apply_rule


def planted(batch=2, tokens=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, dim, generator=g)
    hidden[:, :, 3] += 80.0  # positive MA channel
    hidden[:, :, 9] -= 50.0  # negative MA channel
    hidden[1, 5, 12] = 30.0  # one weaker spike in another channel
    return hidden


def test_mask_finds_the_planted_channels():
    hidden = planted()
    detection = Detection.for_rule("channel_peak")
    assert massive_channel_mask(hidden, detection).nonzero().squeeze(1).tolist() == [3, 9]
    # ratio decides which channels qualify; max_dims keeps the largest
    looser = Detection.for_rule("channel_peak", ratio=5.0)
    assert massive_channel_mask(hidden, looser).nonzero().squeeze(1).tolist() == [3, 9, 12]
    assert massive_channel_mask(hidden, Detection.for_rule("channel_peak", ratio=5.0, max_dims=1)).nonzero().squeeze(
        1).tolist() == [3]
    assert not massive_channel_mask(hidden, Detection.for_rule("channel_peak", ratio=1000.0)).any()


def test_mask_accepts_2d_and_reduces_over_batch():
    hidden = planted()
    looser = Detection.for_rule("channel_peak", ratio=5.0)
    assert torch.equal(massive_channel_mask(hidden[1], looser), massive_channel_mask(hidden[1:], looser))
    # channel 12 spikes only in batch element 1: the peak is taken over the batch
    assert massive_channel_mask(hidden, looser)[12] and not massive_channel_mask(hidden[:1], looser)[12]


def test_peaks_are_exact_max_abs():
    hidden = planted()
    assert torch.equal(channel_peaks(hidden, dim=1), hidden.abs().amax(dim=1))


@pytest.mark.parametrize("rule", DETECTION_RULES)
def test_detection_runs_without_host_synchronisation(rule):
    # Meta tensors have no data: any .item(), .tolist() or branch on a value raises, so this proves sync-freedom.
    hidden = torch.empty(2, 40, 16, device="meta")
    detection = Detection.for_rule(rule, max_dims=4)
    assert massive_channel_mask(hidden, detection).device.type == "meta"
    indices, valid, peaks, threshold = detect_massive(hidden, detection)
    assert indices.shape == valid.shape == (2, 4) and peaks.shape == (2, 16) and threshold.shape == (2,)
    tokens = torch.zeros(40, dtype=torch.bool, device="meta")
    for steer_rule in RULES:
        mask = massive_channel_mask(hidden, detection)
        assert apply_rule(hidden, tokens, mask, rule=steer_rule).device.type == "meta"


def masks(tokens=40, dim=16):
    token_mask = torch.zeros(tokens, dtype=torch.bool)
    token_mask[:10] = True
    channel_mask = torch.zeros(dim, dtype=torch.bool)
    channel_mask[[3, 9]] = True
    return token_mask, channel_mask


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("strength", [1.0, 0.25])
def test_rule_values_at_targets_and_untouched_elsewhere(rule, strength):
    hidden = planted()
    token_mask, channel_mask = masks()
    alpha = 1.5
    out = apply_rule(hidden, token_mask, channel_mask, rule=rule, alpha=alpha, strength=strength)
    selected = token_mask[None, :, None] & channel_mask[None, None, :]
    selected = selected.expand_as(hidden)
    assert torch.equal(out[~selected], hidden[~selected])
    assert out.data_ptr() != hidden.data_ptr()
    for b in range(hidden.shape[0]):
        h = hidden[b][:10][:, [3, 9]]
        if rule == "max_scaled":
            m = hidden[b][:, [3, 9]].abs().max()  # over all tokens and steered channels of b
            target = alpha * m * torch.sign(h)
        elif rule == "per_channel_max":
            m = hidden[b][:, [3, 9]].abs().amax(dim=0)  # per channel, over all tokens of b
            target = alpha * m * torch.sign(h)
        elif rule == "scale":
            target = alpha * h
        else:
            target = torch.zeros_like(h)
        torch.testing.assert_close(out[b][:10][:, [3, 9]], h + strength * (target - h))


@pytest.mark.parametrize("rule", ["max_scaled", "per_channel_max", "scale"])
def test_sign_is_kept(rule):
    hidden = planted()
    token_mask, channel_mask = masks()
    out = apply_rule(hidden, token_mask, channel_mask, rule=rule, alpha=2.0)
    assert torch.equal(torch.sign(out[:, :10][..., [3, 9]]), torch.sign(hidden[:, :10][..., [3, 9]]))
    assert (out[:, :10, 9] < 0).all() and (out[:, :10, 3] > 0).all()


@pytest.mark.parametrize("rule", RULES)
def test_strength_zero_changes_nothing(rule):
    hidden = planted()
    assert torch.equal(apply_rule(hidden, *masks(), rule=rule, alpha=3.0, strength=0.0), hidden)


def test_max_scaled_reference_is_per_batch_element():
    hidden = planted()
    hidden[0, 20, 3] = 500.0  # outside the steered tokens, batch 0 only
    out = apply_rule(hidden, *masks(), rule="max_scaled", alpha=1.0)
    assert torch.allclose(out[0, :10, 3], torch.full((10,), 500.0))
    assert out[1, :10, 3].max() < 500.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(rule="max_scaled", alpha=0.0), "alpha"),
    (dict(rule="scale", alpha=-1.0), "alpha"),
    (dict(rule="max_scaled", strength=1.5), "strength"),
    (dict(rule="boost"), "not a rule"),
])
def test_bad_rule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_rule(planted(), *masks(), **kwargs)
