"""The MA detection rules (stas.core.massive): each threshold computed by hand, states where the rules agree and
where they disagree (docs/analysis.md, "Detection"), and the defaults shared by the library and the config."""

import dataclasses

import pytest
import torch
import yaml

from stas.config.schema import DetectConfig
from stas.core.massive import (DETECTION_RULES, RULE_PRESETS, Detection, detect_massive, massive_channel_mask,
                               massive_threshold)
from stas.paths import CONF_DIR


def gaussian(tokens=200, dim=256, seed=0):
    return torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(seed))


def found(hidden, rule, **settings) -> list[int]:
    return massive_channel_mask(hidden, Detection.for_rule(rule, **settings)).nonzero().flatten().tolist()


def test_each_rule_computes_its_threshold():
    hidden = torch.ones(1, 10, 4)
    hidden[0, :, 0] = 10.0  # peaks (10, 1, 1, 1); mean |h| = (100 + 30) / 40; median |h| = 1
    peaks = hidden.abs().amax(dim=1)
    expected = {"mean_abs": 20 * 130 / 40, "channel_peak": 10 * 1.0, "sun": max(1000 * 1.0, 100.0)}
    for rule, value in expected.items():
        threshold = massive_threshold(hidden, peaks, Detection.for_rule(rule))
        assert threshold.tolist() == pytest.approx([value]), rule
    # the floor binds when ratio x scale is below it
    assert massive_threshold(hidden, peaks, Detection.for_rule("sun", ratio=1.0)).tolist() == [100.0]


def test_rules_agree_on_a_channel_far_above_every_threshold():
    hidden = gaussian()
    hidden[0, :, 3] = 1000.0  # above 20x the mean, 10x the median peak, 1000x the median and 100
    assert all(found(hidden, rule) == [3] for rule in DETECTION_RULES)


def test_rules_agree_on_a_state_without_massive_activations():
    hidden = gaussian()
    assert all(found(hidden, rule) == [] for rule in DETECTION_RULES)


def test_sun_floor_depends_on_the_models_units():
    # The same state at 1/100 of the scale: the relative rules still see channel 3, the absolute floor does not.
    hidden = gaussian()
    hidden[0, :, 3] = 1000.0
    small = hidden / 100
    assert found(small, "mean_abs") == found(small, "channel_peak") == [3]
    assert found(small, "sun") == []


def test_channel_peak_moves_with_the_sequence_length_mean_abs_does_not():
    # A channel at 30x the mean |value| on every token: the median channel peak grows with the number of tokens
    # (each peak is the extreme of more draws), so channel_peak loses the channel on a long sequence.
    def state(tokens):
        hidden = gaussian(tokens=tokens)
        hidden[0, :, 7] = 30 * hidden.abs().mean()
        return hidden

    short, long = state(20), state(20000)
    assert found(short, "mean_abs") == found(long, "mean_abs") == [7]
    assert found(short, "channel_peak") == [7]
    assert found(long, "channel_peak") == []


def test_mean_abs_separates_the_papers_true_and_weak_channels():
    # The paper's true MA channels sit near 59x the mean |value|, its weak ones near 6x.
    hidden = gaussian()
    mean = hidden.abs().mean()
    hidden[0, 0, 11] = 59 * mean
    hidden[0, 0, 12] = 6 * mean
    assert found(hidden, "mean_abs") == [11]


def test_detection_groups_are_independent_and_max_dims_caps():
    hidden = torch.cat([gaussian(seed=1), gaussian(seed=2)])
    hidden[0, :, 3] = 500.0
    hidden[1, :, 5] = 500.0
    hidden[1, :, 6] = 400.0
    indices, is_massive, _, _ = detect_massive(hidden, Detection(max_dims=2))
    assert [sorted(i[m].tolist()) for i, m in zip(indices, is_massive)] == [[3], [5, 6]]
    indices, is_massive, _, _ = detect_massive(hidden, Detection(max_dims=1))
    assert [i[m].tolist() for i, m in zip(indices, is_massive)] == [[3], [5]]


def test_bad_detection_settings_name_the_field():
    with pytest.raises(ValueError, match=r"detect.rule='median' is not a rule; allowed: mean_abs, channel_peak, sun"):
        Detection(rule="median")
    with pytest.raises(ValueError, match=r"detect.ratio=0.0 must be > 0"):
        Detection(ratio=0.0)
    with pytest.raises(ValueError, match=r"detect.max_dims=0 must be an integer >= 1"):
        Detection(max_dims=0)


def test_a_bare_ratio_is_refused_with_the_new_spelling():
    with pytest.raises(TypeError, match=r"detection must be a stas.core.massive.Detection .*got 10.0"):
        massive_channel_mask(gaussian(), 10.0)


def test_library_defaults_equal_the_configs():
    config = DetectConfig()
    assert Detection() == Detection(config.rule, config.ratio, config.floor, config.max_dims)
    for rule in DETECTION_RULES:
        preset = yaml.safe_load((CONF_DIR / "detect" / f"{rule}.yaml").read_text())
        assert preset["rule"] == rule and {k: preset[k] for k in ("ratio", "floor")} == RULE_PRESETS[rule]
        assert preset["max_dims"] == Detection.max_dims and preset["branches"] == config.branches
    default = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
    assert {"detect": Detection.rule} in default
    assert {f.name for f in dataclasses.fields(Detection)} < {f.name for f in dataclasses.fields(DetectConfig)}
