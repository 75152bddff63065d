"""The VBench weights helper (`python -m stas.evaluate --vbench-weights`): every file of every dimension, read from
VBench's own download code, where it goes and whether it is there; ViCLIP's BPE vocabulary copied from openai-clip;
HF_HUB_OFFLINE for the dimensions that load a hub tokenizer when the hub is out of reach."""

import os
from pathlib import Path

import pytest

import stas.evaluation.vbench as vbench_module
from stas.evaluate import main as evaluate_main
from stas.evaluation.scores import DIMENSIONS
from stas.evaluation.vbench import VBenchRunner
from stas.evaluation.vbench_worker import CACHE_FILES, weights

from conftest import compose

BPE = "bpe_simple_vocab_16e6.txt.gz"


@pytest.mark.slow
def test_the_helper_lists_every_file_and_copies_the_bpe_vocabulary(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    (cache / "amt_model").mkdir(parents=True)
    (cache / "amt_model" / "amt-s.pth").write_bytes(b"x")
    # openai-clip ships ViCLIP's vocabulary as clip/bpe_simple_vocab_16e6.txt.gz (checked in its 1.0.1 sdist)
    site = tmp_path / "site"
    (site / "clip").mkdir(parents=True)
    (site / "clip" / "__init__.py").write_text("")
    (site / "clip" / BPE).write_bytes(b"the vocabulary")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    evaluate_main(["--vbench-weights", "eval=vbench_standard", f"eval.vbench.cache_dir={cache}"])
    out = capsys.readouterr().out
    assert out.startswith(f"VBench weights for 16 dimension(s); cache {cache}")
    assert "motion_smoothness: 1 of 1 present\n  present  amt_model/amt-s.pth\n" in out
    assert ("  MISSING  grit_model/grit_b_densecap_objectdet.pth\n           from https://datarelease.blob.core.windows"
            ".net/grit/models/grit_b_densecap_objectdet.pth (declared by vbench.utils.init_submodules)") in out
    assert "temporal_flickering: needs no file" in out
    assert f"copied now from {site / 'clip' / BPE}" in out
    assert (cache / "ViCLIP" / BPE).read_bytes() == b"the vocabulary"
    assert "TorchScript archives" in out
    # Listing creates nothing else in the cache
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) == [
        f"ViCLIP/{BPE}", "amt_model/amt-s.pth"]


def test_the_files_vbench_declares_are_the_probes_catalogue(tmp_path, monkeypatch):
    """What VBench's init_submodules fetches (read from its code, not run) agrees with CACHE_FILES, which the probe
    checks before VBench would download anything."""
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("vbench.utils.CACHE_DIR", str(tmp_path / "cache"))
    answer = weights({"dimensions": list(DIMENSIONS)})
    assert not (tmp_path / "cache").exists()  # nothing downloaded, nothing created
    for dimension in DIMENSIONS:
        files = answer["dimensions"][dimension]
        from_vbench = {(f["path"], f["source"]) for f in files if f["declared_by"] == "vbench.utils.init_submodules"}
        catalogue = {(str(tmp_path / "cache" / relative), source) for relative, source in CACHE_FILES[dimension]}
        # the catalogue names DINO's clone by its hubconf.py, VBench by the folder
        catalogue = {(path[:-len("hubconf.py")] if path.endswith("hubconf.py") else path, source)
                     for path, source in catalogue}
        assert from_vbench <= catalogue, dimension
        assert {f["path"] for f in files} >= {path for path, _ in catalogue}, dimension
        assert not any(f["present"] for f in files if str(tmp_path) in f["path"])
    assert len({f["path"] for f in answer["dimensions"]["subject_consistency"]}) == 3  # + torch hub's copy


def test_hub_dimensions_run_offline_when_the_hub_is_out_of_reach(tmp_path, monkeypatch):
    runner = VBenchRunner(compose().eval.vbench, "cpu", tmp_path)
    runner.env.pop("HF_HUB_OFFLINE", None)
    monkeypatch.setattr(vbench_module, "hub_reachable", lambda: False)
    assert runner.process_env("color")["HF_HUB_OFFLINE"] == "1"
    assert runner.process_env("scene")["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in runner.process_env("temporal_flickering")
    monkeypatch.setattr(vbench_module, "hub_reachable", lambda: True)
    assert "HF_HUB_OFFLINE" not in runner.process_env("color")
    runner.env["HF_HUB_OFFLINE"] = "0"  # the user's own setting wins
    monkeypatch.setattr(vbench_module, "hub_reachable", lambda: False)
    assert runner.process_env("color")["HF_HUB_OFFLINE"] == "0"


def test_the_helper_refuses_unknown_dimensions(capsys):
    with pytest.raises(SystemExit) as caught:
        evaluate_main(["--vbench-weights", "eval.vbench.dimensions=[colour]"])
    assert caught.value.code == 2
    assert "eval.vbench.dimensions=['colour']: name VBench dimensions" in capsys.readouterr().err


def test_the_probe_says_which_dimensions_cannot_run_beside_this_stack(tmp_path):
    from importlib import metadata

    numpy_2 = int(metadata.version("numpy").split(".")[0]) >= 2
    transformers_5 = int(metadata.version("transformers").split(".")[0]) >= 5
    if not (numpy_2 and transformers_5):
        pytest.skip("this environment has VBench's own pins")
    cache = tmp_path / "cache"
    for dimension in ("human_action", "scene", "temporal_flickering"):
        for relative, _ in CACHE_FILES[dimension]:
            (cache / relative).parent.mkdir(parents=True, exist_ok=True)
            (cache / relative).write_bytes(b"")
    runner = VBenchRunner(compose([f"eval.vbench.cache_dir={cache}"]).eval.vbench, "cpu", tmp_path / "logs")
    problems = runner.probe(["human_action", "scene", "temporal_flickering"])
    assert problems["temporal_flickering"] is None
    assert "package(s) too new in" in problems["human_action"]
    assert f"numpy {metadata.version('numpy')} (needs 1.x or older: numpy 2 removed numpy.lib.function_base)" in \
        problems["human_action"]
    assert f"transformers {metadata.version('transformers')} (needs 4.x or older" in problems["scene"]
    assert "eval.vbench.separate_python" in problems["scene"]
