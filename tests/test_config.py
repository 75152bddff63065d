"""Every config composes and validates; bad values fail at start-up with a message naming field and value."""

import pytest

from stas.backbones import CONF_DIR
from stas.config import EXPERIMENTS_DIR, ConfigError, validate

from conftest import REPO, compose

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_group_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("prompts", "file"):
        overrides.append(f"prompts.path={REPO / 'README.md'}")
    cfg = compose(overrides)
    validate(cfg)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment):
    validate(compose([f"experiment={experiment}"]))


def test_ablation_dims_cells_ask_for_the_calibration():
    with pytest.raises(ConfigError, match="steer.dims=calibrated needs steer.calibration"):
        validate(compose(["experiment=ablation_dims", "steer.dims=calibrated"]))


def test_launchers_compose():
    for path in sorted((CONF_DIR / "hydra" / "launcher").glob("*.yaml")):
        compose([f"hydra/launcher={path.stem}"])


BAD = [
    (["model.num_frames=16"], r"model.num_frames=16 must be 4k\+1"),
    (["model.height=60"], r"model.height=60 must be a positive multiple of 16"),
    (["model=wan22_5b", "model.width=1000"], r"model.width=1000 must be a positive multiple of 32"),
    (["model.steps=0"], r"model.steps=0 must be >= 1"),
    (["model.guidance_scale=-1"], r"model.guidance_scale=-1.0 must be >= 0"),
    (["model.dtype=float8"], r"model.dtype='float8' is not allowed; allowed: float32, float16, bfloat16"),
    (["model.cpu_offload=always"], r"model.cpu_offload='always' is not allowed"),
    (["+model.stepz=3"], r"model.stepz is not a field of model"),
    (["steer.alpha=0"], r"steer.alpha=0.0 must be > 0 for rule 'max_scaled'"),
    (["steer.rule=scale", "steer.alpha=-2"], r"steer.alpha=-2.0 must be > 0 for rule 'scale'"),
    (["steer.strength=1.5"], r"steer.strength=1.5 must lie in \[0, 1\]"),
    (["steer.window.start=0.5", "steer.window.end=0.5"], r"start=0.5 must be < end=0.5"),
    (["steer.window.unit=steps", "steer.window.end=11"], r"within \[0, 10\]"),
    (["steer.window.end=1.5"], r"must lie within \[0, 1\]"),
    (["steer.window.unit=minutes"], r"steer.window.unit='minutes' is not allowed"),
    (["steer.layers=[0,2]"], r"steer.layers contains 2; the model has blocks 0..1"),
    (["steer.layers=5:9"], r"steer.layers='5:9' selects no block"),
    (["steer.boundary_width=2"], r"leaves no interior: a latent frame has 4 rows"),
    (["steer.boundary_unit=tokens", "steer.boundary_width=12"], r"leaves no interior: a latent frame has 24 tokens"),
    (["steer.targets=first_frame+edges"], r"unknown target 'edges'"),
    (["steer.rule=boost"], r"steer.rule='boost' is not a rule; allowed: max_scaled"),
    (["steer.branches=neg"], r"steer.branches='neg' is not allowed; allowed: cond, uncond, both"),
    (["steer.dims=calibrated"], r"steer.dims=calibrated needs steer.calibration"),
    (["steer.dims=calibrated", "steer.calibration=/nonexistent/ma_dims.yaml"], r"no such file"),
    (["steer.dims=[3,99]"], r"channel list must be non-empty integers in 0..31"),
    (["steer.dims=sometimes"], r"steer.dims='sometimes' is not allowed"),
    (["prompts=file"], r"prompts=file needs prompts.path"),
    (["prompts.samples_per_prompt=0"], r"prompts.samples_per_prompt=0 must be >= 1"),
    (["shard.index=3", "shard.count=3"], r"shard.index=3 must lie in \[0, shard.count=3\)"),
    (["logger.mode=loud"], r"logger.mode='loud' is not allowed"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def test_steering_off_skips_steer_checks():
    validate(compose(["steer=none", "steer.alpha=-1"]))


def test_cli_bad_input_is_one_clear_line(cli, tmp_path):
    result = cli("stas.run", "steer.alpha=-1", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "stas.run: error: steer.alpha=-1.0 must be > 0 for rule 'max_scaled'"
    assert not (tmp_path / "run" / "videos").exists()


def test_cli_unknown_option_lists_the_available_ones(cli, tmp_path):
    result = cli("stas.run", "model=nonexistent", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Could not find 'model/nonexistent'" in result.stderr
    for name in ("tiny_wan21", "wan21_1.3b", "cogvideox5b", "cogvideox2b", "wan22_5b"):
        assert name in result.stderr


def test_cli_typo_and_wrong_type_fail_at_composition(cli, tmp_path):
    typo = cli("stas.run", "model.stepz=3", cwd=tmp_path)
    assert typo.returncode != 0 and "Key 'stepz' not in 'ModelConfig'" in typo.stderr
    wrong = cli("stas.run", "model.steps=many", cwd=tmp_path)
    assert wrong.returncode != 0 and "Value 'many' of type 'str' could not be converted to Integer" in wrong.stderr
    assert "Traceback" not in typo.stderr + wrong.stderr


def test_cli_unwritable_output_dir(cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = cli("stas.run", f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "output directory cannot be created" in result.stderr and str(blocker) in result.stderr
    assert blocker.read_text() == "not a directory"


def test_help_lists_groups_and_options(cli, tmp_path):
    result = cli("stas.run", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for text in ("model:", "steer:", "prompts:", "logger:", "tiny_cogvideox", "stas_paper", "none"):
        assert text in result.stdout
