"""Every config composes and validates; bad values fail at start-up with a message naming field and value."""

import pytest

from stas.paths import CONF_DIR
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


def test_launchers_and_sweepers_compose():
    for group in ("launcher", "sweeper"):
        for path in sorted((CONF_DIR / "hydra" / group).glob("*.yaml")):
            compose([f"hydra/{group}={path.stem}"])


def test_the_search_sweeper_takes_its_direction_from_search_direction():
    from stas.cli import compose_config

    cfg = compose_config(["hydra/sweeper=search", "search.direction=minimize"], with_hydra=True)
    assert cfg.hydra.sweeper.direction == "minimize" and cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    search = compose_config(["experiment=tiny_search"], with_hydra=True)
    assert search.hydra.sweeper.direction == "maximize" and search.search.metric == "pixel/consistency"


BAD = [
    (["model.num_frames=16"], r"model.num_frames=16 must be 4k\+1"),
    (["model.height=60"], r"model.height=60 must be a positive multiple of 16"),
    (["model=wan22_5b", "model.width=1000"], r"model.width=1000 must be a positive multiple of 32"),
    (["model.steps=0"], r"model.steps=0 must be an integer in \[1, 10000\]"),
    (["model.guidance_scale=-1"], r"model.guidance_scale=-1.0 must be a finite number in \[0, 100\]"),
    (["model.dtype=float8"], r"model.dtype='float8' is not allowed; allowed: float32, float16, bfloat16"),
    (["model.cpu_offload=always"], r"model.cpu_offload='always' is not allowed"),
    (["+model.stepz=3"], r"model.stepz is not a field of model"),
    (["steer.alpha=0"], r"steer.alpha=0.0 must be > 0 for rule 'max_scaled'"),
    (["steer.rule=scale", "steer.alpha=-2"], r"steer.alpha=-2.0 must be > 0 for rule 'scale'"),
    (["steer.strength=1.5"], r"steer.strength=1.5 must be a finite number in \(0, 1\]"),
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
    (["steer.dims=[3,199]"], r"channel list must be non-empty integers in 0..127"),
    (["steer.dims=sometimes"], r"steer.dims='sometimes' is not allowed"),
    (["prompts=file"], r"prompts=file needs prompts.path"),
    (["prompts.samples_per_prompt=0"], r"prompts.samples_per_prompt=0 must be >= 1"),
    (["shard.index=3", "shard.count=3"], r"shard.index=3 must lie in \[0, shard.count=3\)"),
    (["logger.mode=loud"], r"logger.mode='loud' is not allowed"),
    # NaN passes every `value < minimum` check and inf reaches the model: every float must be finite
    (["model.guidance_scale=nan"], r"^model.guidance_scale=nan must be a finite number in \[0, 100\]$"),
    (["model.guidance_scale=inf"], r"^model.guidance_scale=inf must be a finite number in \[0, 100\]$"),
    (["model.guidance_scale=100.5"], r"model.guidance_scale=100.5 must be a finite number in \[0, 100\]"),
    (["model.flow_shift=nan"], r"model.flow_shift=nan must be a finite number in \[0.01, 100\]"),
    (["steer.alpha=inf"], r"^steer.alpha=inf must be a finite number$"),
    (["steer.alpha=nan"], r"^steer.alpha=nan must be a finite number$"),
    (["steer.alpha=100.5"], r"steer.alpha=100.5 must be a finite number in \(0, 100\]"),
    (["steer.strength=nan"], r"steer.strength=nan must be a finite number in \(0, 1\]"),
    (["detect.ratio=nan"], r"detect.ratio=nan must be a finite number in \(0, 1000000\]"),
    (["detect.ratio=0"], r"detect.ratio=0.0 must be a finite number in \(0, 1000000\]"),
    (["detect.floor=-1"], r"detect.floor=-1.0 must be a finite number in \[0, 1000000000\]"),
    (["detect.max_dims=0"], r"detect.max_dims=0 must be >= 1"),
    (["detect.rule=median"], r"detect.rule='median' is not allowed; allowed: mean_abs, channel_peak, sun"),
    (["detect.branches=both"], r"detect.branches='both' is not allowed; allowed: per_branch, shared"),
    (["detect.branches=shared", "steer.branches=uncond"], r"detect.branches=shared steers both branches with the "
                                                          r"channels detected on the cond branch"),
    (["steer.reference=global"], r"steer.reference='global' is not allowed; allowed: ma_max, steered"),
    (["detect.rule=sun"], r"detect.rule=sun with mean_abs's ratio 20 and floor 0: choose a rule with its own "
                          r"settings by detect=sun, or set detect.ratio and detect.floor too"),
    # fields that moved: the message says where
    (["steer.ratio=10"], r"^steer.ratio moved to detect.ratio: one MA detection"),
    (["analysis.max_dims=4"], r"^analysis.max_dims moved to detect.max_dims"),
    (["steer.window.start=nan"], r"^steer.window.start=nan must be a finite number$"),
    (["steer.window.unit=steps", "steer.window.end=inf"], r"^steer.window.end=inf must be a finite number$"),
    (["model.tiny.plant.magnitudes=[60,nan,30]"], r"^model.tiny.plant.magnitudes\[1\]=nan must be a finite number$"),
    (["detect.floor=inf"], r"^detect.floor=inf must be a finite number in \[0, 1000000000\]$"),
    # values that used to fail late, after the model loaded
    (["model.max_sequence_length=0"], r"model.max_sequence_length=0 must be an integer in \[1, 4096\]"),
    (["model.steps=10001"], r"model.steps=10001 must be an integer in \[1, 10000\]"),
    (["model.steps=100000000000000000000"], r"model.steps=100000000000000000000 must be an integer in \[1, 10000\]"),
    (["model.steps=1e20"], r"model.steps=1e\+20 must be an integer in \[1, 10000\]"),
    (["model.fps=0"], r"model.fps=0 must be an integer in \[1, 240\]"),
    (["seed=-1"], r"seed=-1 must be an integer in \[0, 9223372036854775807\]"),
    (["seed=9223372036854775808"], r"seed=9223372036854775808 must be an integer in \[0, 9223372036854775807\]"),
    (["seed=9223372036854775807", "prompts.samples_per_prompt=2"],
     r"seed=9223372036854775807 is too large for prompts.samples_per_prompt=2: sample i uses seed \+ i"),
    (["model.tiny.seed=-1"], r"model.tiny.seed=-1 must be an integer in \[0, 9223372036854775807\]"),
    # configurations that would steer nothing
    (["model.steps=1"], r"steer.window=\[0.0, 0.4\) \(fraction\) of model.steps=1 contains no step: STAS would "
                        r"steer nothing"),
    (["model.steps=4", "steer.window.end=0.05"], r"steer.window=\[0.0, 0.05\) \(fraction\) of model.steps=4 contains "
                                                 r"no step"),
    (["steer.strength=0"], r"steer.strength=0.0 must be a finite number in \(0, 1\]"),
    (["steer.rule=scale"], r"steer.alpha=1.0 with steer.rule=scale leaves every value as it is"),
    (["steer.branches=uncond", "model.guidance_scale=1"], r"steer.branches=uncond, but model tiny_wan21 runs no "
                                                          r"classifier-free guidance at these settings "
                                                          r"\(model.guidance_scale=1.0: CFG needs > 1\)"),
    (["model.num_frames=1", "steer.targets=boundary"], r"steer.targets='boundary' selects no token of a "
                                                       r"1-latent-frame video"),
    # keys that are not fields, values their field cannot hold
    (["+seedd=1"], r"^seedd is not a field of the config; fields: analysis, detect, eval, experiment, guidance, "
                   r"logger, model, name, paths, progress, prompts, search, seed, shard, steer$"),
    (["+shard.indx=1"], r"^shard.indx is not a field of shard; fields: count, index$"),
    (["steer.targts=boundary"], r"^steer.targts is not a field of steer; fields: alpha, boundary_unit, "),
    (["~steer.calibratio"], r"^steer.calibratio is not a field of steer"),
    (["+steer.window.middle=0.5"], r"^steer.window.middle is not a field of steer.window; fields: end, start, unit$"),
    (["shard.index=abc"], r"^shard.index='abc' must be an integer$"),
    (["shard.index="], r"^shard.index='' must be an integer$"),
    (["model.guidance_scale=high"], r"^model.guidance_scale='high' must be a number in \[0, 100\]$"),
    (["progress=sometimes"], r"^progress='sometimes' must be true or false$"),
    (["guidance.name=apg2"], r"^guidance.name='apg2' is not allowed; allowed: cfg, cfg_zero_star, apg, slg, pag, enhance_a_video$"),
    (["guidance=apg", "+guidance.params.etaa=0"], r"^guidance.params.etaa is not a parameter of diffusers' "
                                                  r"AdaptiveProjectedGuidance \(guidance=apg\); parameters: "),
    (["+guidance.params.guidance_scale=3"], r"^guidance.params.guidance_scale is set by the loop from "
                                            r"model.guidance_scale \(HunyuanVideo: model.true_cfg_scale\); set "
                                            r"that instead$"),
    (["guidance.params.guidance_rescale=2"], r"^guidance.params.guidance_rescale=2 must be an integer in \[0, 1\]$"),
    # values that passed and then gave a black video or crashed late (adversarial review)
    (["model.flow_shift=1e-300"], r"^model.flow_shift=1e-300 must be a finite number in \[0.01, 100\]$"),
    (["model.tiny.plant.magnitudes=[1e308,-1e308,1e308]"], r"model.tiny.plant.magnitudes contains 1e\+308"),
    (["model.tiny.text_dim=0"], r"^model.tiny.text_dim=0 must be an integer in \[1, 4096\]$"),
    (["model.tiny.vae_base_dim=0"], r"^model.tiny.vae_base_dim=0 must be an integer in \[1, 4096\]$"),
    (["eval.pixel.size=100000"], r"^eval.pixel.size=100000 must be an integer in \[1, 1024\]$"),
    (["eval.temporal_compression=1000000"], r"^eval.temporal_compression=1000000 must be an integer in \[1, 64\]$"),
    (["logger.log_videos=-1"], r"^logger.log_videos=-1 must be an integer in \[0, 100000\]$"),
    # a search's objective (search.metric): read from the run's own metrics.json
    (["search.direction=up"], r"^search.direction='up' is not allowed; allowed: maximize, minimize$"),
    (["search.metric=consistency"], r"^search.metric='consistency' must be evaluator/metric as metrics.json names it"),
    (["eval=none", "search.metric=pixel/consistency"], r"^search.metric='pixel/consistency' needs 'pixel' in "
                                                        r"eval.evaluators \(now \[\]\)"),
    (["search.metric=pixel/consistency", "shard.count=2", "shard.index=0"], r"cannot be read from a sharded run"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


GOOD = [
    ["model.guidance_scale=0"], ["model.guidance_scale=100"], ["model.steps=10000"], ["model.steps=3"],
    ["model.flow_shift=100"], ["model.max_sequence_length=4096"], ["model.fps=240"],
    ["seed=0"], ["seed=9223372036854775807"], ["seed=9223372036854775806", "prompts.samples_per_prompt=2"],
    ["steer.alpha=100"], ["steer.strength=1"], ["steer.strength=0.01"], ["detect.ratio=1e6"], ["detect=sun"], ["detect=channel_peak"], ["detect.rule=sun", "detect.ratio=500"],
    ["detect.branches=shared"], ["steer.reference=steered"],
    ["guidance=cfg_zero_star"], ["guidance=apg", "guidance.params.eta=0"],
    ["steer.rule=scale", "steer.alpha=2"], ["steer.rule=zero", "steer.alpha=1"],
    ["steer.branches=uncond"], ["steer.branches=cond", "model.guidance_scale=1"],
    ["model.num_frames=1", "steer.targets=first_frame"], ["model.steps=4", "steer.window.end=0.25"],
    ["shard.index=2", "shard.count=3"], ["seed=${model.steps}"], ["hydra.run.dir=x"],
    ["steer=none", "steer.alpha=nan"], ["steer=none", "model.steps=1"],  # unused steer values are not checked
    ["search.metric=pixel/consistency", "search.direction=minimize"], ["search.metric=vbench/quality_score"],
]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(o) for o in GOOD])
def test_values_at_the_edges_are_accepted(overrides):
    validate(compose(overrides))


def test_steering_off_skips_steer_checks():
    validate(compose(["steer=none", "steer.alpha=-1"]))


@pytest.mark.slow
def test_slurm_array_variables_do_not_shard_a_cell(cli, tmp_path):
    """`-m ... hydra/launcher=slurm` runs every cell as an array task: $SLURM_ARRAY_TASK_ID numbers the cells, so it
    must not make each cell generate only every N-th of its items."""
    result = cli("stas.run", "prompts.prompts=[a cat,a dog,a bird]", "model.steps=2", "logger=none", "eval=none",
                 "progress=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                 env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert result.returncode == 0, result.stderr
    assert "3 video(s) generated" in result.stdout
    assert len((tmp_path / "run" / "generation.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "run" / "shards").exists()


@pytest.mark.slow
def test_cli_bad_input_is_one_clear_line(cli, tmp_path):
    result = cli("stas.run", "steer.alpha=-1", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "stas.run: error: steer.alpha=-1.0 must be > 0 for rule 'max_scaled'"
    assert not (tmp_path / "run" / "videos").exists()


@pytest.mark.slow
def test_cli_unknown_option_lists_the_available_ones(cli, tmp_path):
    result = cli("stas.run", "model=nonexistent", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Could not find 'model/nonexistent'" in result.stderr
    for name in ("tiny_wan21", "wan21_1.3b", "cogvideox5b", "cogvideox2b", "wan22_5b"):
        assert name in result.stderr


@pytest.mark.parametrize("tool,args,message", [
    ("stas.run", ["steer.targts=boundary"], "steer.targts is not a field of steer; fields: alpha, boundary_unit, "
                                           "boundary_width, branches, calibration, compile_hook, dims, enabled, "
                                           "layers, name, reference, rule, strength, targets, window"),
    ("stas.run", ["-m", "steer.targts=boundary,all"], "steer.targts is not a field of steer; fields: alpha, "),
    ("stas.run", ["+seedd=1"], "seedd is not a field of the config; fields: analysis, detect, eval, "),
    ("stas.run", ["model.stepz=3"], "model.stepz is not a field of model; fields: "),
    ("stas.run", ["model.steps=many"], "model.steps='many' must be an integer in [1, 10000]"),
    ("stas.run", ["-m", "shard.index=0,abc"], "shard.index='abc' must be an integer"),
    ("stas.run", ["model.guidance_scale=nan"], "model.guidance_scale=nan must be a finite number in [0, 100]"),
    ("stas.analyze", ["analysis.ratoi=3"], "analysis.ratoi is not a field of analysis; fields: "),
])
@pytest.mark.slow
def test_cli_typo_and_wrong_type_are_one_line_naming_the_field(cli, tmp_path, tool, args, message):
    """Not Hydra's "Could not override ... To append to your config use +steer.targts=..." (exit 1)."""
    result = cli(tool, *args, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                 cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: {message}"), result.stderr
    assert "+steer" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "sweep").exists()
    written = {path.name for path in (tmp_path / "run").iterdir()} if (tmp_path / "run").exists() else set()
    assert written <= {".hydra", "cli.log"}  # at most Hydra's own record of the command line


def test_compose_config_names_the_field_of_a_typo():
    with pytest.raises(ConfigError, match=r"^steer.targts is not a field of steer; fields: alpha, "):
        compose(["steer.targts=boundary"])
    with pytest.raises(ConfigError, match=r"^shard.index='x' must be an integer$"):
        compose(["shard.index=x"])


@pytest.mark.slow
def test_cli_unwritable_output_dir(cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = cli("stas.run", f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "output directory cannot be created" in result.stderr and str(blocker) in result.stderr
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_help_lists_groups_and_options(cli, tmp_path):
    result = cli("stas.run", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for text in ("model:", "steer:", "prompts:", "logger:", "tiny_cogvideox", "stas_paper", "none"):
        assert text in result.stdout


SHIPPED_CALIBRATION = EXPERIMENTS_DIR / "calibration" / "tiny_wan21_ma_dims.yaml"
BAD_CALIBRATIONS = [
    ("model: tiny_wan21\nlayers: {0: {massive: [5, -1]}}\n", r"layers.0.massive has channel -1; model 'tiny_wan21' "
                                                            r"has channels 0..127"),
    ("model: tiny_wan21\nlayers: {0: {massive: [5, 999]}}\n", r"layers.0.massive has channel 999"),
    ("model: tiny_wan21\nlayers: {0: {massive: [5.7, 17]}}\n", r"layers.0.massive must be a list of channel indices "
                                                              r"\(integers\), got \[5.7, 17\]"),
    ("model: tiny_wan21\nlayers: {0: {massive: [true]}}\n", r"layers.0.massive must be a list of channel indices"),
    ("model: tiny_wan21\nlayers: {0: {massive: 5}}\n", r"layers.0.massive must be a list of channel indices"),
    ("model: tiny_wan21\nlayers: {0: [5, 17]}\n", r"layers.0.massive must be a list of channel indices"),
    ("model: tiny_wan21\nlayers: {0: {massive: [5, 5]}}\n", r"layers.0.massive lists a channel twice: \[5, 5\]"),
    ("model: tiny_wan21\nlayers: {7: {massive: [5]}}\n", r"layers has block 7; model 'tiny_wan21' has blocks 0..1"),
    ("model: tiny_wan21\nlayers: {'0': {massive: [5]}}\n", r"layers has block '0'"),
    ("model: tiny_wan21\nlayers: {0: {massive: [5]}\n", r"is not valid YAML: "),
    ("- 5\n- 17\n", r"is not an ma_dims.yaml written by stas.analyze"),
    ("model: tiny_wan21\nlayers: [5, 17]\n", r"is not an ma_dims.yaml written by stas.analyze"),
    ("model: tiny_cogvideox\nlayers: {0: {massive: [5]}}\n", r"was calibrated on model 'tiny_cogvideox', not "
                                                            r"'tiny_wan21'"),
    ("model: tiny_wan21\nlayers: {0: {massive: []}, 1: {massive: []}}\n", r"lists no massive channel for the steered "
                                                                          r"blocks \[0, 1\]: STAS would steer nothing"),
    (b"model: tiny_wan21 \xff\nlayers: {}\n", r"is not UTF-8 text \(byte 0xff at offset 18\)"),
]


@pytest.mark.parametrize("text,message", BAD_CALIBRATIONS, ids=[m.split(":")[0][:40] for _, m in BAD_CALIBRATIONS])
def test_calibration_file_is_checked_against_the_model_at_start_up(tmp_path, text, message):
    path = tmp_path / "ma_dims.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=rf"^steer.calibration='{path}': {message}"):
        validate(compose(["steer.dims=calibrated", f"steer.calibration={path}"]))


def test_calibration_steering_layers_it_does_not_list_steers_nothing(tmp_path):
    path = tmp_path / "ma_dims.yaml"
    path.write_text("model: tiny_wan21\nlayers: {0: {massive: [5, 17]}}\n")
    validate(compose(["steer.dims=calibrated", f"steer.calibration={path}"]))  # block 0 is steered
    with pytest.raises(ConfigError, match=r"lists no massive channel for the steered blocks \[1\]"):
        validate(compose(["steer.dims=calibrated", f"steer.calibration={path}", "steer.layers=[1]"]))
    for dims in ("calibrated", "calibrated_weak", "calibrated_non_ma"):  # the shipped file is valid for every kind
        validate(compose([f"steer.dims={dims}", f"steer.calibration={SHIPPED_CALIBRATION}"]))


@pytest.mark.slow
def test_bad_calibration_fails_before_the_model_loads(cli, tmp_path):
    path = tmp_path / "ma_dims.yaml"
    path.write_text("model: tiny_wan21\nlayers: {0: {massive: [5, 999]}}\n")
    result = cli("stas.run", "steer.dims=calibrated", f"steer.calibration={path}", "logger=none",
                 f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"stas.run: error: steer.calibration='{path}': layers.0.massive has channel 999; "
                                     "model 'tiny_wan21' has channels 0..127")
    assert not (tmp_path / "run" / "run_identity.yaml").exists() and not (tmp_path / "run" / "videos").exists()
