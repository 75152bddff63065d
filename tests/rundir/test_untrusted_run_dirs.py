"""A run directory someone hands you is untrusted input: merge, evaluate, tables and side-by-side read its paths and
rows only after checking them, refuse with one line (exit 2) naming the file and row, and write nothing then."""

import importlib.util
import json
import os
import shutil
import subprocess

import pytest

from stas.evaluate import main as evaluate_main
from stas.merge import main as merge_main
from stas.video import read_mp4

from conftest import REPO, run_cli
from test_generation import gen

PROMPTS = "prompts.prompts=[a cat,a dog]"
RUN_ARGS = ["logger=none", "eval=none", "progress=false", PROMPTS, "model.steps=2"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A real run of stas.run (two videos, .hydra overrides), copied by each test before it tampers with it."""
    root = tmp_path_factory.mktemp("base")
    done = run_cli("stas.run", *RUN_ARGS, f"hydra.run.dir={root / 'run'}", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


def snapshot(root):
    """Every entry under root, not following links: files by content, inode and mtime (a rewrite with the same
    bytes shows), links by target, folders by name."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            stat = os.lstat(path)
            if os.path.islink(path):
                entries[path] = ("link", os.readlink(path))
            elif name in files:
                entries[path] = (open(path, "rb").read(), stat.st_ino, stat.st_mtime_ns)
            else:
                entries[path] = "dir"
    return entries


def rewrite_rows(path, change):
    """Replace the JSON-lines file's rows by change(rows) (a row may become any JSON value)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(row) + "\n" for row in change(rows)))


def one_line_error(stderr, tool):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), stderr[-3000:]
    return lines[0]


@pytest.fixture
def shards(base_run, tmp_path):
    """target holds 'a cat' only, source the whole run: merging copies 'a dog' (key 1:0) from source."""
    target, source = tmp_path / "target", tmp_path / "source"
    shutil.copytree(base_run, target, symlinks=True)
    shutil.copytree(base_run, source, symlinks=True)
    (target / "videos" / "a dog-0.mp4").unlink()
    rewrite_rows(target / "generation.jsonl", lambda rows: [r for r in rows if r["key"] != "1:0"])
    return target, source


def set_dog_path(source, path):
    rewrite_rows(source / "generation.jsonl", lambda rows: [dict(r, path=path) if r["key"] == "1:0" else r
                                                            for r in rows])


@pytest.mark.slow
def test_merge_refuses_a_row_path_that_leaves_through_a_symlink(shards, tmp_path):
    """The exploit of issue 11: '..' after a symlink in the source reads the attacker's file there, and on the
    target side climbs out of the target, e.g. into a site-packages folder (a .pth file runs at every start)."""
    target, source = shards
    site_packages = tmp_path / "site-packages"
    site_packages.mkdir()
    (source / "p" / "q").mkdir(parents=True)
    (source / "lnk").symlink_to("p/q")  # source/lnk/../.. is source, target/lnk/../.. is tmp_path
    (source / "site-packages").mkdir()
    (source / "site-packages" / "evil.pth").write_text("import os; os.system('echo pwned')\n")
    set_dog_path(source, "lnk/../../site-packages/evil.pth")
    assert (source / "lnk/../../site-packages/evil.pth").is_file()  # the row is real on the source side
    before, outside_before = snapshot(target), snapshot(tmp_path)
    result = run_cli("stas.merge", target, source, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line_error(result.stderr, "stas.merge")
    assert f"{source / 'generation.jsonl'}, row with key '1:0'" in line
    assert "'lnk/../../site-packages/evil.pth' contains '..'" in line
    assert not (site_packages / "evil.pth").exists() and list(site_packages.iterdir()) == []
    assert snapshot(target) == before
    assert snapshot(tmp_path) == outside_before


@pytest.mark.parametrize("case", ["absolute path", "video linked out", "videos folder linked out",
                                  "target videos folder linked out"])
def test_merge_refuses_paths_that_leave_videos(shards, tmp_path, capsys, case):
    target, source = shards
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.mp4"
    shutil.copy(source / "videos" / "a dog-0.mp4", secret)
    if case == "absolute path":  # read from anywhere, written anywhere
        set_dog_path(source, str(secret))
        named = f"row with key '1:0': video path {str(secret)!r} is absolute"
    elif case == "video linked out":  # the file itself is a link to a file elsewhere
        (source / "videos" / "a dog-0.mp4").unlink()
        (source / "videos" / "a dog-0.mp4").symlink_to(secret)
        named = f"row with key '1:0': video path 'videos/a dog-0.mp4' leads to {secret.resolve()}, outside"
    elif case == "videos folder linked out":
        shutil.rmtree(source / "videos")
        (source / "videos").symlink_to(outside)
        shutil.copy(secret, outside / "a dog-0.mp4")
        named = "is under " + str(source / "videos") + ", a link that leads out of the run directory"
    else:  # the copy would land in the folder the target's videos/ links to
        shutil.move(target / "videos", outside / "videos")
        (target / "videos").symlink_to(outside / "videos")
        named = "is under " + str(target / "videos") + ", a link that leads out of the run directory"
    before, outside_before = snapshot(target), snapshot(outside)
    with pytest.raises(SystemExit) as exited:
        merge_main([str(target), str(source)])
    assert exited.value.code == 2
    assert named in one_line_error(capsys.readouterr().err, "stas.merge")
    assert snapshot(target) == before and snapshot(outside) == outside_before


def tag_identity(run):
    (run / "run_identity.yaml").write_text("!!python/object/apply:os.system ['echo pwned']\n")


def list_identity(run):
    (run / "run_identity.yaml").write_text("- model\n- steer\n")


@pytest.mark.parametrize("which, tamper, message", [
    ("source", lambda run: (run / "items.jsonl").unlink(), "source has no items.jsonl"),
    ("target", lambda run: (run / "items.jsonl").unlink(), "target has no items.jsonl"),
    ("source", tag_identity, "run_identity.yaml is not readable YAML: could not determine a constructor for the tag "
                             "'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("target", list_identity, "run_identity.yaml holds a list, not the mapping of config keys"),
    ("source", lambda run: rewrite_rows(run / "generation.jsonl", lambda rows: [rows[0], ["a", "list"]]),
     'generation.jsonl: row ["a", "list"] is not a JSON object'),
    ("source", lambda run: rewrite_rows(run / "generation.jsonl", lambda rows: [{k: v for k, v in r.items()
                                                                                 if k != "path"} for r in rows]),
     "generation.jsonl: row {\"key\": \"0:0\", "),
    ("source", lambda run: rewrite_rows(run / "generation.jsonl", lambda rows: [{k: v for k, v in r.items()
                                                                                 if k != "key"} for r in rows]),
     "has no 'key'; each row must have key (a string), prompt (a string), seed (an integer), path (a string)"),
    ("source", lambda run: rewrite_rows(run / "items.jsonl", lambda rows: rows + [7]),
     "items.jsonl: row 7 is not a JSON object"),
    ("source", lambda run: (run / "metrics.jsonl").write_text('{"video": "a cat-0.mp4", "value": 0.5}\n'),
     "metrics.jsonl: row {\"video\": \"a cat-0.mp4\", \"value\": 0.5} has no 'prompt'"),
    ("source", lambda run: rewrite_rows(run / "generation.jsonl", lambda rows: [dict(r, path="videos/a cat-0.mp4")
                                                                                for r in rows]),
     "row with key '1:0': its video 'videos/a cat-0.mp4' is not the one items.jsonl names for that key "
     "(videos/a dog-0.mp4)"),
])
def test_merge_refuses_malformed_run_files_before_writing(shards, capsys, which, tamper, message):
    target, source = shards
    tamper(target if which == "target" else source)
    before = snapshot(target)
    with pytest.raises(SystemExit) as exited:
        merge_main([str(target), str(source)])
    assert exited.value.code == 2
    assert message in one_line_error(capsys.readouterr().err, "stas.merge")
    assert snapshot(target) == before


def test_merge_of_clean_shards_still_copies(shards, capsys):
    """The checks refuse only what leaves videos/: the same shards, untampered, merge (the control)."""
    target, source = shards
    merge_main([str(target), str(source)])  # complete: no SystemExit
    assert "2/2 videos in" in capsys.readouterr().out
    assert (target / "videos" / "a dog-0.mp4").read_bytes() == (source / "videos" / "a dog-0.mp4").read_bytes()


@pytest.fixture
def run_copy(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run, symlinks=True)
    return run


def outside_video(run, tmp_path):
    secret = tmp_path / "secret.mp4"
    shutil.copy(run / "videos" / "a dog-0.mp4", secret)
    return secret


def loop_video(run, tmp):
    (run / "videos" / "a dog-0.mp4").unlink()
    (run / "videos" / "a dog-0.mp4").symlink_to("a dog-0.mp4")


def metrics_folder(run, tmp):
    (run / "metrics.jsonl").mkdir()


def alias_bomb(run, tmp):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 9)]
    with open(run / "run_identity.yaml", "a") as handle:
        handle.write("\n".join(lines) + "\n")


def link_dog_out(run, tmp_path):
    secret = outside_video(run, tmp_path)
    (run / "videos" / "a dog-0.mp4").unlink()
    (run / "videos" / "a dog-0.mp4").symlink_to(secret)


@pytest.mark.parametrize("tamper, message", [
    (lambda run, tmp: (run / "metrics.jsonl").write_text(
        '{"prompt": "a cat", "evaluator": "pixel", "metric": "consistency", "value": 0.9}\n'),
     "metrics.jsonl: row {\"prompt\": \"a cat\", \"evaluator\": \"pixel\", \"metric\": \"consistency\", \"value\": 0.9} has "
     "no 'video'; each row must have video (a string), prompt (a string), evaluator (a string), metric (a string), "
     "value (a number or null)"),
    (lambda run, tmp: rewrite_rows(run / "items.jsonl", lambda rows: [{k: v for k, v in r.items() if k != "key"}
                                                                      for r in rows]),
     "items.jsonl: row {\"prompt\": \"a cat\", \"index\": 0, \"seed\": 0, \"file\": \"a cat-0.mp4\"} has no 'key'"),
    (lambda run, tmp: (run / ".hydra" / "overrides.yaml").write_text("- model.steps=2\n- [unclosed\n"),
     ".hydra/overrides.yaml is not readable YAML: "),
    (lambda run, tmp: (run / ".hydra" / "overrides.yaml").write_text("model: tiny_wan21\n"),
     ".hydra/overrides.yaml holds {'model': 'tiny_wan21'}; Hydra writes a list of override strings there"),
    (lambda run, tmp: (run / ".hydra" / "overrides.yaml").write_text("42\n"), ".hydra/overrides.yaml holds 42; "),
    (lambda run, tmp: tag_identity(run), "run_identity.yaml is not readable YAML"),
    (lambda run, tmp: rewrite_rows(run / "items.jsonl", lambda rows: [
        dict(r, file=f"../../{outside_video(run, tmp).name}") if r["key"] == "1:0" else r for r in rows]),
     "items.jsonl, row with key '1:0': file '../../secret.mp4' is not a plain file name"),
    (lambda run, tmp: link_dog_out(run, tmp),
     "items.jsonl, row with key '1:0': video path 'videos/a dog-0.mp4' leads to "),
    # found by an adversarial pass
    (loop_video, "video path 'videos/a dog-0.mp4' cannot be resolved"),
    (metrics_folder, "metrics.jsonl cannot be read: Is a directory"),
    (alias_bomb, "run_identity.yaml is not readable YAML: aliases are not allowed"),
])
def test_evaluate_refuses_tampered_run_dirs_before_writing(run_copy, tmp_path, capsys, tamper, message):
    tamper(run_copy, tmp_path)
    before = snapshot(run_copy)
    with pytest.raises(SystemExit) as exited:
        evaluate_main([str(run_copy), "eval.evaluators=[pixel]", "logger=none", "progress=false"])
    assert exited.value.code == 2
    assert message in one_line_error(capsys.readouterr().err, "stas.evaluate")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_evaluate_checks_metric_rows_before_wandb_writes_anything(run_copy, tmp_path):
    """With the default logger (W&B offline) too: the rows are checked before the logger opens its run."""
    (run_copy / "metrics.jsonl").write_text('[1, 2]\n')
    before = snapshot(run_copy)
    result = run_cli("stas.evaluate", run_copy, "eval.evaluators=[pixel]", "progress=false", cwd=tmp_path)
    assert result.returncode == 2
    assert "metrics.jsonl: row [1, 2] is not a JSON object" in one_line_error(result.stderr, "stas.evaluate")
    assert snapshot(run_copy) == before


@pytest.fixture
def read_only(tmp_path):
    """read_only(folder): a read-only copy of the folder. chmod where permissions hold; as root (who ignores them)
    a tmpfs mounted read-only, else the test is skipped."""
    mounts = []

    def make(source):
        copy = tmp_path / f"read-only-{len(mounts)}"
        shutil.copytree(source, copy, symlinks=True)
        subprocess.run(["chmod", "-R", "a-w", str(copy)], check=True)
        if not os.access(copy, os.W_OK):
            return copy
        subprocess.run(["chmod", "-R", "u+w", str(copy)], check=True)
        shutil.rmtree(copy)
        copy.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(copy)],
                          capture_output=True).returncode != 0:
            pytest.skip("running as root, where chmod does not make a folder read-only, and cannot mount a tmpfs")
        mounts.append(copy)
        shutil.copytree(source, copy, symlinks=True, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(copy)], check=True)
        assert not os.access(copy, os.W_OK)
        return copy

    yield make
    for mount in mounts:
        subprocess.run(["umount", str(mount)], check=True)
    subprocess.run(["chmod", "-R", "u+w", str(tmp_path)], check=True)


@pytest.mark.slow
def test_rerun_evaluation_and_merge_in_a_read_only_run_dir_are_one_line_errors(base_run, tmp_path, read_only):
    run = read_only(base_run)
    rerun = run_cli("stas.run", *RUN_ARGS, f"hydra.run.dir={run}", cwd=tmp_path)
    assert rerun.returncode == 2
    line = one_line_error(rerun.stderr, "stas")
    assert f"hydra.run.dir={str(run)!r}: the output directory cannot be written: " in line
    evaluation = run_cli("stas.evaluate", run, "eval.evaluators=[pixel]", "logger=none", cwd=tmp_path)
    assert evaluation.returncode == 2
    assert (f"{str(run)!r}: the output directory cannot be written: "
            in one_line_error(evaluation.stderr, "stas.evaluate"))
    merged = run_cli("stas.merge", run, cwd=tmp_path)
    assert merged.returncode == 2
    assert f"{str(run)!r}: the output directory cannot be written: " in one_line_error(merged.stderr, "stas.merge")
    # the control: a writable copy of the same run evaluates
    writable = tmp_path / "writable"
    shutil.copytree(base_run, writable, symlinks=True)
    assert run_cli("stas.evaluate", writable, "eval.evaluators=[pixel]", "logger=none",
                   cwd=tmp_path).returncode == 0


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "analysis" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("script", ["tables", "side_by_side"])
def test_out_pointing_at_a_file_is_refused(base_run, tmp_path, capsys, script):
    out = tmp_path / "out"
    out.write_text("my notes")
    args = [str(base_run), "--out", str(out), *(["--wandb", "none"] if script == "tables" else ["--prompts", "1"])]
    if script == "side_by_side":
        args.insert(0, str(base_run))  # a run beside itself: every video pairs
    assert load_script(script)(args) == 2
    assert f"{str(out)!r}: the output directory is a file" in one_line_error(capsys.readouterr().err, script)
    assert out.read_text() == "my notes"


def retype_identity(run, group, key, value):
    import yaml

    identity = yaml.safe_load((run / "run_identity.yaml").read_text())
    identity[group][key] = value
    (run / "run_identity.yaml").write_text(yaml.safe_dump(identity))


@pytest.mark.parametrize("tamper, message", [
    (list_identity, "run_identity.yaml holds a list"),
    (lambda run: (run / "run_identity.yaml").write_text("seed: 0\n"),
     "run_identity.yaml lacks model.name, model.fps, steer.enabled, steer.name"),
    (lambda run: (run / "metrics.jsonl").write_text('{"video": "a cat-0.mp4"}\n'), "metrics.jsonl: row"),
    (lambda run: set_dog_path(run, "/etc/passwd"), "row with key '1:0': video path '/etc/passwd' is absolute"),
    (lambda run: retype_identity(run, "steer", "enabled", "false"),
     "run_identity.yaml: steer.enabled='false' is not of the type stas.run writes (bool)"),
    (lambda run: retype_identity(run, "model", "name", ["x", {"y": 1}]),
     "run_identity.yaml: model.name=['x', {'y': 1}] is not of the type stas.run writes (str)"),
    (lambda run: (run / ".hydra" / "held" / "hydra.yaml").write_text("hydra: {runtime: {choices: [steer]}}\n"),
     "hydra.yaml has no hydra.runtime.choices mapping of config groups to options"),
])
def test_tables_refuse_malformed_runs(run_copy, tmp_path, capsys, tamper, message):
    tamper(run_copy)
    out = tmp_path / "tables"
    assert load_script("tables")([str(run_copy), "--out", str(out), "--wandb", "none"]) == 2
    assert message in one_line_error(capsys.readouterr().err, "tables")
    assert not out.exists()


def test_side_by_side_pairs_runs_by_prompt_and_seed(base_run, tmp_path, capsys):
    """Runs of different prompt lists pair by prompt text, not by position; nothing in common is refused."""
    shifted = tmp_path / "shifted"
    gen(shifted, "prompts.prompts=[a dog,a bird]", "model.steps=2")  # 'a dog' is item 0:0 here, 1:0 in base_run
    side_by_side = load_script("side_by_side")
    assert side_by_side([str(base_run), str(shifted), "--out", str(tmp_path / "pairs")]) == 0
    assert sorted(p.name for p in (tmp_path / "pairs").glob("*.mp4")) == ["a dog-0.mp4"]
    assert side_by_side([str(base_run), str(shifted), "--out", str(tmp_path / "k"), "--keys", "0:0"]) == 2
    assert "--keys 0:0: not a video of" in one_line_error(capsys.readouterr().err, "side_by_side")
    reseeded = tmp_path / "reseeded"
    gen(reseeded, PROMPTS, "model.steps=2", "seed=5")  # same prompts, other seeds: nothing to compare
    assert side_by_side([str(base_run), str(reseeded), "--out", str(tmp_path / "none")]) == 2
    assert "share no generated video of the same prompt and seed" in one_line_error(capsys.readouterr().err,
                                                                                    "side_by_side")
    assert not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory):
    """base_run's prompts and seeds without steering (steer=none)."""
    run = tmp_path_factory.mktemp("vanilla") / "run"
    gen(run, PROMPTS, "model.steps=2", "steer=none")
    return run


def latent_marks(frames, right, y):
    """The frames whose latent row is amber (a new latent frame starts) at column `right`, row `y` (H.264 blurs
    colours a little: amber is red high and blue low, the grey between marks has red low)."""
    red, blue = frames[:, y, right, 0].astype(int), frames[:, y, right, 2].astype(int)
    assert all((r > 200 and b < 80) or r < 100 for r, b in zip(red, blue)), list(zip(red, blue))
    return [t for t, r in enumerate(red) if r > 200]


@pytest.mark.slow
def test_side_by_side_marks_latent_chunks_and_shows_what_steering_changed(vanilla_run, base_run, tmp_path, capsys,
                                                                           monkeypatch):
    """Vanilla | STAS | x4 |STAS - vanilla| of the tiny Wan twin: 17 frames, latent rows amber at the backbone's chunk
    starts (4x: 0, 1, 5, 9, 13; a made-up 2x moves them), the difference panel lit, and black for a run beside
    itself."""
    from stas.backbones import FAMILIES

    side_by_side = load_script("side_by_side")
    assert side_by_side([str(vanilla_run), str(base_run), "--out", str(tmp_path / "c"), "--diff"]) == 0
    assert "2 comparison video(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "c").glob("*.mp4")) == ["a cat-0.mp4", "a dog-0.mp4"]
    frames = read_mp4(tmp_path / "c" / "a cat-0.mp4")
    assert frames.shape == (17, 16 + 64 + 2 * 14, 3 * 96 + 2 * 4, 3)
    latent_row = 16 + 64 + 14 + 7
    for left in (0, 100, 200):
        assert latent_marks(frames, left + 93, latent_row) == [0, 1, 5, 9, 13]
    changed = frames[:, 16:80, 203:293].astype(float).mean()
    assert side_by_side([str(base_run), str(base_run), "--out", str(tmp_path / "self"), "--diff"]) == 0
    unchanged = read_mp4(tmp_path / "self" / "a cat-0.mp4")[:, 16:80, 203:293].astype(float)
    assert unchanged.mean() < 1 and changed > 10 * max(unchanged.mean(), 0.1), (changed, unchanged.mean())
    monkeypatch.setattr(FAMILIES["wan21"], "temporal_compression", 2)  # from the backbone, not a constant 4
    assert side_by_side([str(vanilla_run), str(base_run), "--out", str(tmp_path / "c2"), "--prompts", "1"]) == 0
    frames = read_mp4(tmp_path / "c2" / "a cat-0.mp4")
    assert frames.shape == (17, 16 + 64 + 2 * 14, 2 * 96 + 4, 3)
    assert latent_marks(frames, 93, latent_row) == [0, 1, 3, 5, 7, 9, 11, 13, 15]


@pytest.mark.slow
def test_side_by_side_scales_other_resolutions_and_cuts_to_the_shortest_video(base_run, tmp_path, capsys):
    """A 9-frame 48x64 run beside the 17-frame 64x96 one: scaled to 64 rows (85 columns), cut to 9 frames; a
    difference of the two aspect ratios is refused before anything is written."""
    short = tmp_path / "short"
    gen(short, PROMPTS, "model.steps=2", "steer=none", "model.num_frames=9", "model.height=48", "model.width=64")
    side_by_side = load_script("side_by_side")
    assert side_by_side([str(base_run), str(short), "--out", str(tmp_path / "c"), "--prompts", "1"]) == 0
    assert "a cat-0.mp4: the runs' videos have 17, 9 frames: cut to the shortest (9)" in capsys.readouterr().out
    frames = read_mp4(tmp_path / "c" / "a cat-0.mp4")
    assert frames.shape == (9, 16 + 64 + 2 * 14, 96 + 4 + 85 + 1, 3)  # + 1: H.264 needs an even width
    assert side_by_side([str(base_run), str(short), "--out", str(tmp_path / "d"), "--diff"]) == 2
    assert ("a difference panel needs videos of one aspect ratio: scaled to one height they are 96x64 and 85x64 "
            in one_line_error(capsys.readouterr().err, "side_by_side"))
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args, message", [
    (["--diff", "--diff-gain", "0"], "--diff-gain=0: must be a number in (0, 255] (default 4"),
    (["--diff", "--diff-gain", "nan"], "--diff-gain=nan: must be a number in (0, 255]"),
    (["--diff", "--diff-gain", "-4"], "--diff-gain=-4: must be a number in (0, 255]"),
    (["--diff-gain", "8"], "--diff-gain=8 needs --diff"),
    (["--height", "3"], "--height=3: must be an integer in [16, 4096] pixels"),
    (["--prompts", "0"], "--prompts=0: must be at least 1"),
])
def test_side_by_side_refuses_bad_options(base_run, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert load_script("side_by_side")([str(base_run), str(base_run), "--out", str(out), *args]) == 2
    assert message in one_line_error(capsys.readouterr().err, "side_by_side")
    assert not out.exists()


def test_side_by_side_refuses_missing_runs_and_unknown_backbones(run_copy, base_run, tmp_path, capsys):
    side_by_side, out = load_script("side_by_side"), tmp_path / "out"
    assert side_by_side([str(base_run), str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'missing'} is not a directory" in one_line_error(capsys.readouterr().err, "side_by_side")
    several = tmp_path / "several"
    for name in ("a", "b"):
        shutil.copytree(base_run, several / name, symlinks=True)
    assert side_by_side([str(base_run), str(several), "--out", str(out)]) == 2
    assert (f"{several} holds 2 runs ({several / 'a'}, {several / 'b'}): give the directory of one of them"
            in one_line_error(capsys.readouterr().err, "side_by_side"))
    retype_identity(run_copy, "model", "family", "sora")
    assert side_by_side([str(base_run), str(run_copy), "--out", str(out)]) == 2
    assert ("run_identity.yaml: model.family='sora' is not a backbone family stas knows (allowed: "
            in one_line_error(capsys.readouterr().err, "side_by_side"))
    with pytest.raises(SystemExit) as exited:  # argparse: its usage line, then the field and the value
        side_by_side([str(base_run), str(base_run), "--out", str(out), "--diff", "--diff-gain", "x"])
    assert exited.value.code == 2 and "argument --diff-gain: invalid float value: 'x'" in capsys.readouterr().err
    assert not out.exists()


# ---- found by an adversarial pass: the run's own files as links, strict JSON, loops, folders, alias bombs


def link_metrics_out(run, outside):
    (run / "metrics.jsonl").symlink_to(outside / "created.jsonl")


def link_shards_out(run, outside):
    (run / "shards").symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("tamper, args, message", [
    (link_metrics_out, [], "metrics.jsonl is a symbolic link; the files of a run directory are never links"),
    (link_shards_out, ["shard.index=0", "shard.count=2"], "shards is a symbolic link"),
])
def test_evaluate_never_writes_through_a_linked_record_file(run_copy, tmp_path, capsys, tamper, args, message):
    """Appending metric rows followed a link: the attacker chose the file outside the run that got the rows."""
    outside = tmp_path / "outside"
    outside.mkdir()
    tamper(run_copy, outside)
    before, outside_before = snapshot(run_copy), snapshot(outside)
    with pytest.raises(SystemExit) as exited:
        evaluate_main([str(run_copy), "eval.evaluators=[pixel]", "logger=none", "progress=false", *args])
    assert exited.value.code == 2
    assert message in one_line_error(capsys.readouterr().err, "stas.evaluate")
    assert snapshot(run_copy) == before and snapshot(outside) == outside_before == {}


def test_merge_never_reads_a_linked_record_file(shards, tmp_path, capsys):
    target, source = shards
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"secret": "outside content"}\n')
    (source / "generation.jsonl").unlink()
    (source / "generation.jsonl").symlink_to(secret)
    before = snapshot(target)
    with pytest.raises(SystemExit) as exited:
        merge_main([str(target), str(source)])
    assert exited.value.code == 2
    line = one_line_error(capsys.readouterr().err, "stas.merge")
    assert "generation.jsonl is a symbolic link" in line and "outside content" not in line
    assert snapshot(target) == before


@pytest.mark.parametrize("bad_line", ['{"video": "a cat-0.mp4", "value": NaN}', '{"value": Infinity}',
                                      '{"value": 1e999}', '{"seed": ' + "9" * 5001 + "}", "[" * 100000 + "]" * 100000])
def test_lines_that_strict_json_refuses_are_left_out_like_torn_ones(tmp_path, bad_line):
    """Python's json reads NaN, Infinity and 1e999 (which no writer here may write back) and fails with other
    errors than JSONDecodeError on huge numbers and deep nesting: all of them are lines to leave out."""
    from stas.rundir import JsonlRecords, read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text('{"key": "a"}\n' + bad_line + '\n{"key": "b"}\n')
    assert read_jsonl(path) == [{"key": "a"}, {"key": "b"}]
    assert list(JsonlRecords(path, key=lambda row: row["key"]).rows) == ["a", "b"]
    assert read_jsonl(path) == [{"key": "a"}, {"key": "b"}]  # compacted: the file is strict JSON again
