"""The hierarchy verdict and the period test (stas.ma.hierarchy) can say no: flat and partial profiles, entries
without MAs, too few prompts, effects below the minimum, aperiodic signals. Pure functions on synthetic region
statistics first, then stas.analyze on tiny twins with flat, first-frame-only and default plants."""

from __future__ import annotations

import math

import pytest
import torch

from stas.backbones.tiny import planted_profile
from stas.core.layout import TokenLayout
from stas.ma.analysis import hierarchy_line, log_analysis
from stas.ma.hierarchy import (VerdictSettings, autocorrelation, frame_rotation_null, hierarchy_verdict,
                               sequence_period)
from stas.ma.stats import region_entries, summarise

from conftest import compose
from test_analysis import analysis_cfg, run_analysis

DEFAULT, FLAT, FIRST_ONLY = (1.0, 0.5, 0.1), (1.0, 1.0, 1.0), (1.0, 0.1, 0.1)
LAYERS, STEPS, BRANCHES = 3, 4, 2


def synthetic_regions(profile, prompts=8, noise=0.05, samples=1, seed=0) -> torch.Tensor:
    """(prompts x samples, L, T, B, 3, 2) region means = profile x (1 + noise x N(0, 1)), maxima twice the means;
    each prompt also has its own scale (MA magnitudes differ by prompt; the ratios must not care)."""
    generator = torch.Generator().manual_seed(seed)
    n = prompts * samples
    scale = torch.rand(prompts, generator=generator).repeat_interleave(samples) * 50 + 10
    noisy = 1 + noise * torch.randn(n, LAYERS, STEPS, BRANCHES, 3, generator=generator, dtype=torch.float64)
    means = torch.tensor(profile, dtype=torch.float64) * noisy * scale[:, None, None, None, None]
    return torch.stack([means, 2 * means], dim=-1).float()


def prompt_list(prompts: int, samples: int = 1) -> list[str]:
    return [f"prompt {p}" for p in range(prompts) for _ in range(samples)]


def verdict(regions, samples=1, **settings):
    prompts = regions.shape[0] // samples
    return hierarchy_verdict(regions, prompt_list(prompts, samples), list(range(STEPS)), VerdictSettings(**settings))


def pair_verdicts(result) -> dict:
    return {name: pair["verdict"] for name, pair in result["ratios"].items()}


# ------------------------------------------------------------------------------------------------ the verdict


@pytest.mark.parametrize("profile,expected", [
    (DEFAULT, ("holds", "holds", "holds", "holds")),
    (FLAT, ("does_not_hold", "does_not_hold", "does_not_hold", "does_not_hold")),
    (FIRST_ONLY, ("does_not_hold", "holds", "does_not_hold", "holds")),
    ((0.1, 0.5, 1.0), ("does_not_hold", "does_not_hold", "does_not_hold", "does_not_hold")),  # reversed
])
def test_profiles_give_their_verdicts(profile, expected):
    result = verdict(synthetic_regions(profile))
    overall, first_boundary, boundary_interior, first_interior = expected
    assert result["verdict"] == overall
    assert pair_verdicts(result) == {"first_over_boundary": first_boundary,
                                     "boundary_over_interior": boundary_interior,
                                     "first_over_interior": first_interior}
    for name, (a, b) in {"first_over_boundary": (0, 1), "boundary_over_interior": (1, 2),
                         "first_over_interior": (0, 2)}.items():
        pair = result["ratios"][name]
        assert pair["ratio"] == pytest.approx(profile[a] / profile[b], rel=0.02)
        assert pair["ci"][0] <= pair["ratio"] <= pair["ci"][1]
        assert pair["prompts"] == 8 and pair["observations"] == 8 * LAYERS * STEPS * BRANCHES
    assert result["counts"] == {"prompts": 8, "samples": 8, "observations": 8 * LAYERS * STEPS * BRANCHES,
                                "observations_without_ma": 0, "entries": LAYERS * STEPS, "entries_without_ma": 0}
    assert (result["reason"].startswith("the 95% intervals")) == (overall == "holds")


def test_the_old_strict_test_would_have_passed_a_flat_profile():
    """With a flat profile the region means still differ a little, so `first > boundary > interior` holds by chance
    in some entries (and for exact ties in none): a strict comparison is no test. The verdict says no."""
    regions = synthetic_regions(FLAT, noise=0.01)
    means = regions[..., 0].mean(dim=(0, 3))  # (L, T, R), the old per-entry test
    assert ((means[..., 0] > means[..., 1]) & (means[..., 1] > means[..., 2])).any()
    assert verdict(regions)["verdict"] == "does_not_hold"


def test_entries_without_mas_are_excluded_and_counted_not_failed():
    regions = synthetic_regions(DEFAULT)
    reference = verdict(regions)
    missing = regions.clone()
    missing[:, :, 3] = 0.0  # no channel qualified at the last step: every MA magnitude is 0
    missing[0, 0, 0, 0] = 0.0  # and in one observation
    missing[:, 2, 1] = math.nan  # one (block, step) never captured
    result = verdict(missing)
    assert result["verdict"] == "holds"
    observations = 8 * LAYERS * STEPS * BRANCHES - 8 * BRANCHES
    assert result["counts"] == {"prompts": 8, "samples": 8, "observations": observations,
                                "observations_without_ma": 8 * LAYERS * BRANCHES + 1,
                                "entries": LAYERS * STEPS - 1, "entries_without_ma": LAYERS}
    used = observations - 8 * LAYERS * BRANCHES - 1
    assert all(pair["observations"] == used for pair in result["ratios"].values())
    for name, pair in result["ratios"].items():
        assert pair["ratio"] == pytest.approx(reference["ratios"][name]["ratio"], rel=0.01)
    assert result["by_step"]["3"]["verdict"] == "inconclusive"  # nothing to judge there, not a failure
    assert math.isnan(result["by_step"]["3"]["first_over_boundary"]["ratio"])
    entries = region_entries(missing, list(range(LAYERS)), list(range(STEPS)))
    assert entries["0"]["3"]["with_ma"] == 0 and entries["0"]["3"]["observations"] == 8 * BRANCHES
    assert math.isnan(entries["0"]["3"]["first_over_boundary"]) and entries["0"]["3"]["first_frame"]["max"] == 0
    assert entries["0"]["0"]["with_ma"] == 8 * BRANCHES - 1  # the zero observation leaves the mean alone
    assert entries["0"]["0"]["first_over_boundary"] == pytest.approx(2.0, rel=0.05)
    assert entries["2"]["1"]["observations"] == 0


def test_without_any_ma_the_verdict_is_inconclusive():
    result = verdict(torch.zeros(4, LAYERS, STEPS, BRANCHES, 3, 2))
    assert result["verdict"] == "inconclusive" and "0 prompt(s) with MAs" in result["reason"]
    assert result["counts"]["entries_without_ma"] == result["counts"]["entries"] == LAYERS * STEPS


@pytest.mark.parametrize("prompts,samples", [(1, 1), (1, 4), (2, 3)])
def test_fewer_prompts_than_min_prompts_is_inconclusive(prompts, samples):
    """A bootstrap over one prompt has a point for an interval, over two the range of two values: no evidence.
    Samples of one prompt (other seeds) are not other prompts."""
    regions = synthetic_regions(DEFAULT, prompts=prompts, samples=samples)
    result = verdict(regions, samples=samples)
    assert result["verdict"] == "inconclusive"
    assert f"{prompts} prompt(s) with MAs, the bootstrap over prompts needs at least 3 (analysis.min_prompts)" == \
        result["reason"]
    assert result["counts"]["prompts"] == prompts and result["counts"]["samples"] == prompts * samples
    assert all(math.isnan(bound) for pair in result["ratios"].values() for bound in pair["ci"])
    assert result["ratios"]["first_over_boundary"]["ratio"] == pytest.approx(2.0, rel=0.05)  # still reported
    if prompts == 2:
        assert verdict(regions, samples=samples, min_prompts=2)["verdict"] == "holds"


def test_samples_are_averaged_within_their_prompt():
    """3 prompts x 4 samples: 3 bootstrap units, each the pool of its samples."""
    regions = synthetic_regions(DEFAULT, prompts=3, samples=4)
    result = verdict(regions, samples=4)
    assert result["counts"]["prompts"] == 3 and result["ratios"]["first_over_boundary"]["prompts"] == 3
    assert result["verdict"] == "holds"


def test_an_effect_below_the_minimum_does_not_hold_unless_the_minimum_is_lowered():
    regions = synthetic_regions((1.03, 1.0, 0.5), noise=0.01)
    result = verdict(regions)
    assert pair_verdicts(result)["first_over_boundary"] == "does_not_hold"  # 3 % < 5 %
    assert result["ratios"]["first_over_boundary"]["ci"][0] > 1.0  # though clearly above 1
    assert "first/boundary: 95% interval" in result["reason"] and "lies below 1.05" in result["reason"]
    lowered = verdict(regions, min_effect=0.01)
    assert lowered["verdict"] == "holds" and lowered["settings"]["min_effect"] == 0.01


def test_a_noisy_effect_is_inconclusive():
    """Prompts disagree: the interval straddles 1 + min_effect."""
    regions = synthetic_regions((1.1, 1.0, 0.5), prompts=6, seed=3)
    spread = torch.tensor([0.8, 1.3, 0.9, 1.25, 1.0, 1.15])  # per-prompt first-frame factor
    regions[:, :, :, :, 0] *= spread[:, None, None, None, None]
    result = verdict(regions)
    low, high = result["ratios"]["first_over_boundary"]["ci"]
    assert low < 1.05 < high
    assert result["verdict"] == "inconclusive" and "contains 1.05" in result["reason"]


def test_by_step_finds_the_hierarchy_in_early_steps_only():
    regions = torch.cat([synthetic_regions(DEFAULT)[:, :, :2], synthetic_regions(FLAT)[:, :, 2:]], dim=2)
    result = verdict(regions)
    assert [result["by_step"][str(t)]["verdict"] for t in range(STEPS)] == ["holds", "holds", "does_not_hold",
                                                                          "does_not_hold"]
    assert result["verdict"] == "holds"  # over all steps the early ones carry it: read by_step too


def test_the_verdict_is_reproducible_and_scale_free():
    regions = synthetic_regions(DEFAULT, noise=0.2)
    assert verdict(regions) == verdict(regions)
    scaled = regions.clone()
    scaled[:, 0] *= 1000  # one block with much larger MAs does not dominate the geometric mean
    for name, pair in verdict(scaled)["ratios"].items():  # the same up to float32 rounding
        reference = verdict(regions)["ratios"][name]
        assert pair["ratio"] == pytest.approx(reference["ratio"], rel=1e-6)
        assert pair["ci"] == pytest.approx(reference["ci"], rel=1e-6)
    assert verdict(regions, seed=1)["ratios"]["first_over_boundary"]["ci"] != \
        verdict(regions)["ratios"]["first_over_boundary"]["ci"]


# ----------------------------------------------------------------------------------------------------- period


LAYOUT = TokenLayout(5, 4, 6)


def plant(first_frame, boundary, interior):
    return compose(["model=tiny_wan21", f"model.tiny.plant.first_frame={first_frame}",
                    f"model.tiny.plant.boundary={boundary}", f"model.tiny.plant.interior={interior}"]).model.tiny.plant


def noise(scale=0.01, seed=0, n=LAYOUT.num_tokens):
    return scale * torch.rand(n, generator=torch.Generator().manual_seed(seed))


def test_the_null_statistic_is_the_autocorrelation_at_one_frame():
    tokens = planted_profile(LAYOUT, plant(*DEFAULT)) + noise()
    chunks = tokens[LAYOUT.tokens_per_frame:]
    observed, null = frame_rotation_null(chunks, LAYOUT.tokens_per_frame, 500, 0)
    assert observed == pytest.approx(autocorrelation(chunks)[LAYOUT.tokens_per_frame].item(), abs=1e-12)
    assert null.shape == (500,) and null.abs().max() <= 1.0


def test_a_planted_chunked_profile_is_evidence():
    result = sequence_period(planted_profile(LAYOUT, plant(*DEFAULT)) + noise(), LAYOUT)
    assert result["period"] == LAYOUT.tokens_per_frame and result["period_evidence"]
    assert result["null_p"] == pytest.approx(1 / 1001)  # no rotation of the frames matches it
    assert result["autocorrelation_at_frame"] > 0.5 > abs(result["null_mean"])


@pytest.mark.parametrize("name,tokens", [
    ("noise", noise(1.0, seed=1)),
    ("flat plant", planted_profile(LAYOUT, plant(*FLAT)) + noise()),
    ("first-frame-only plant", planted_profile(LAYOUT, plant(*FIRST_ONLY)) + noise()),
    ("constant", torch.ones(LAYOUT.num_tokens)),
    # frames growing in magnitude: a high autocorrelation at every lag, but nothing aligned to the frame starts
    ("trend over frames", torch.arange(LAYOUT.frames).repeat_interleave(LAYOUT.tokens_per_frame).float() + noise()),
])
def test_aperiodic_signals_are_not_evidence(name, tokens):
    result = sequence_period(tokens, LAYOUT)
    assert not result["period_evidence"]
    assert result["null_p"] > 0.05, name


def test_a_pattern_repeating_every_row_is_not_a_frame_period():
    """Significant against the null (rotations break it too), but its period is a row, not a frame."""
    row = torch.tensor([5.0, 1, 1, 1, 1, 1])
    tokens = row.repeat(LAYOUT.num_tokens // LAYOUT.width) + noise()
    result = sequence_period(tokens, LAYOUT)
    assert result["period"] == LAYOUT.width and not result["period_is_frame"] and not result["period_evidence"]


def test_short_videos_have_no_period():
    layout = TokenLayout(2, 4, 6)
    result = sequence_period(torch.rand(layout.num_tokens), layout)
    assert result["period"] is None and result["null_p"] is None and not result["period_evidence"]


# ----------------------------------------------------------------------------------------- stas.analyze, end to end


def plant_overrides(profile):
    return [f"model.tiny.plant.{region}={value}" for region, value in zip(("first_frame", "boundary", "interior"),
                                                                         profile)]


@pytest.mark.parametrize("profile,expected", [
    (FLAT, {"first_over_boundary": "does_not_hold", "boundary_over_interior": "does_not_hold"}),
    (FIRST_ONLY, {"first_over_boundary": "holds", "boundary_over_interior": "does_not_hold"}),
])
def test_flat_and_first_frame_only_plants_do_not_hold(profile, expected, tmp_path):
    cfg = analysis_cfg("tiny_wan21", "prompts.limit=3", "model.steps=2", "analysis.plots=[]",
                       *plant_overrides(profile))
    result = run_analysis(tmp_path, cfg)
    hierarchy = result.summary["hierarchy"]
    assert hierarchy["verdict"] == "does_not_hold" and hierarchy["variant"] == "vanilla"
    assert {name: hierarchy["ratios"][name]["verdict"] for name in expected} == expected
    assert hierarchy["counts"]["entries_without_ma"] == 0  # the plant is detected: the verdict is about the profile
    assert not any(p["period_evidence"] for p in result.summary["results"]["vanilla"]["profiles"])
    assert "hierarchy: does_not_hold (first/boundary" in str(result) and "lies below 1.05" in str(result)


def test_default_plant_holds_and_entries_without_mas_are_counted(tmp_path):
    """tiny_cogvideox: its fixed-size plant may stop qualifying as massive after a few steps. Those entries are
    counted apart; the verdict comes from the others."""
    cfg = analysis_cfg("tiny_cogvideox", "prompts.limit=3", "analysis.plots=[]")
    result = run_analysis(tmp_path, cfg)
    hierarchy = result.summary["hierarchy"]
    assert hierarchy["verdict"] == "holds"
    regions = result.summary["results"]["vanilla"]["regions"]
    empty = sum(entry["with_ma"] == 0 for steps in regions.values() for entry in steps.values())
    assert hierarchy["counts"]["entries_without_ma"] == empty
    assert hierarchy["counts"]["entries"] == 2 * cfg.model.steps
    assert f"{empty} without MAs" in hierarchy_line(hierarchy)


def test_one_prompt_is_inconclusive_and_logged(tiny_pipelines, tmp_path):
    cfg = analysis_cfg("tiny_wan21", "prompts.limit=1", "model.steps=2", "analysis.plots=[]")
    result = run_analysis(tmp_path, cfg, tiny_pipelines["tiny_wan21"][2])
    hierarchy = result.summary["hierarchy"]
    assert hierarchy["verdict"] == "inconclusive" and "needs at least 3 (analysis.min_prompts)" in hierarchy["reason"]
    stats = torch.load(tmp_path / "ma_stats.pt")
    lowered = summarise(stats, cfg.analysis.min_frequency, cfg.analysis.weak, cfg.analysis.non_ma,
                        VerdictSettings(min_prompts=2))  # recomputed with other settings: still one prompt
    assert lowered["hierarchy"]["verdict"] == "inconclusive"

    class Recorder:
        def log_image(self, *args):
            pass

        def log_table(self, *args):
            pass

        def summary(self, totals):
            self.totals = totals

    recorder = Recorder()
    log_analysis(recorder, result.summary, [])
    assert recorder.totals["vanilla/hierarchy"] == "inconclusive"
    assert recorder.totals["vanilla/first_over_boundary_verdict"] == "inconclusive"
    assert recorder.totals["vanilla/entries_without_ma"] == 0
    assert isinstance(recorder.totals["vanilla/period_evidence_L1_s0"], bool)
