"""Prompt files and custom VBench JSON files: read exactly, refused with a one-line message naming file and line."""

import json
import re

import pytest

from stas.config import ConfigError
from stas.prompts import load_prompts

from conftest import compose

# Every character str.splitlines splits on besides "\n" and "\r": inside a line they are part of the prompt.
SEPARATORS = ["\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def file_prompts(path):
    return load_prompts(compose(["prompts=file", f"prompts.path={path}"]).prompts)


@pytest.mark.parametrize("separator", SEPARATORS, ids=[f"U+{ord(s):04X}" for s in SEPARATORS])
def test_a_prompt_file_splits_on_newlines_only(tmp_path, separator):
    path = tmp_path / "prompts.txt"
    path.write_text(f"a cat{separator}on a mat\nsecond prompt\r\n\n", encoding="utf-8")
    assert file_prompts(path) == [f"a cat{separator}on a mat", "second prompt"]


def test_a_prompt_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\nan owl\nun café été\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^prompts.path='{path}': line 3 is not UTF-8 text \(byte 0xe9 at column 7\)"
                                          r"; save the file as UTF-8$"):
        file_prompts(path)
    path.write_text("a cat\nan owl\nun café été\n", encoding="utf-8")
    assert file_prompts(path) == ["a cat", "an owl", "un café été"]


def test_a_prompt_file_that_cannot_be_read_is_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"^prompts.path='{tmp_path}': cannot be read: Is a directory$"):
        file_prompts(tmp_path)


def vbench_prompts(path, *overrides):
    return load_prompts(compose(["prompts=vbench", f"prompts.path={path}", *overrides]).prompts)


BAD_VBENCH = [
    ('[{"prompt_en": "a cat"}, {"prompt": "a dog"}]', r"entry 1 must be an object with a string 'prompt_en', got "
                                                      r"\{\"prompt\": \"a dog\"\}"),
    ('[{"prompt_en": 3}]', r"entry 0 must be an object with a string 'prompt_en', got \{\"prompt_en\": 3\}"),
    ('["a cat", "a dog"]', r"entry 0 must be an object with a string 'prompt_en', got \"a cat\""),
    ('{"prompt_en": "a cat"}', r"must be a JSON list of objects with 'prompt_en', not a dict"),
    ('[{"prompt_en": "a cat",}]', r"is not valid JSON: Expecting property name enclosed in double quotes at line 1, "
                                  r"column 24"),
    (b'[{"prompt_en": "caf\xe9"}]', r"is not UTF-8 text \(byte at offset 19\)"),
]


@pytest.mark.parametrize("text,message", BAD_VBENCH, ids=[m.split(" ")[0] + m.split(" ")[-1] for _, m in BAD_VBENCH])
def test_a_custom_vbench_file_is_checked(tmp_path, text, message):
    path = tmp_path / "info.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=rf"^prompts.path='{path}': {message}"):
        vbench_prompts(path)


def test_a_custom_vbench_file_filters_by_dimension(tmp_path):
    path = tmp_path / "info.json"
    entries = [{"prompt_en": "a cat", "dimension": ["subject_consistency"]},
               {"prompt_en": "a dog", "dimension": ["temporal_flickering", "overall_consistency"]}]
    path.write_text(json.dumps(entries))
    assert vbench_prompts(path) == ["a cat", "a dog"]
    assert vbench_prompts(path, "prompts.vbench_dimensions=[temporal_flickering]") == ["a dog"]
    path.write_text(json.dumps([{"prompt_en": "a cat"}]))  # no dimensions: fine unless asked to filter by them
    assert vbench_prompts(path) == ["a cat"]
    with pytest.raises(ConfigError, match=r"entry 0 needs 'dimension', a list of VBench dimension names"):
        vbench_prompts(path, "prompts.vbench_dimensions=[temporal_flickering]")
    with pytest.raises(ConfigError, match=rf"^prompts.path='{tmp_path / 'nope.json'}': no such file"):
        vbench_prompts(tmp_path / "nope.json")


def test_per_dimension_takes_the_first_prompts_of_each_dimension_in_the_files_order(tmp_path):
    path = tmp_path / "info.json"
    entries = [{"prompt_en": "a cat", "dimension": ["subject_consistency", "dynamic_degree"]},
               {"prompt_en": "a cat again", "dimension": ["subject_consistency"]},
               {"prompt_en": "a dog", "dimension": ["dynamic_degree", "color"]},
               {"prompt_en": "a red car", "dimension": ["color"]},
               {"prompt_en": "a blue car", "dimension": ["color"]}]
    path.write_text(json.dumps(entries))
    # A prompt listed twice counts once: per_dimension=2 still takes a second prompt of subject_consistency
    repeated = [entries[0], {"prompt_en": "a cat", "dimension": ["subject_consistency"]}, *entries[1:]]
    (tmp_path / "repeated.json").write_text(json.dumps(repeated))
    assert vbench_prompts(tmp_path / "repeated.json", "prompts.per_dimension=2")[:2] == ["a cat", "a cat again"]
    assert vbench_prompts(path, "prompts.per_dimension=1") == ["a cat", "a dog"]
    assert vbench_prompts(path, "prompts.per_dimension=2") == ["a cat", "a cat again", "a dog", "a red car"]
    assert vbench_prompts(path, "prompts.per_dimension=1", "prompts.vbench_dimensions=[color]") == ["a dog"]
    assert vbench_prompts(path, "prompts.per_dimension=5") == [entry["prompt_en"] for entry in entries]
    path.write_text(json.dumps([{"prompt_en": "a cat"}]))
    with pytest.raises(ConfigError, match=r"entry 0 needs 'dimension', .* for prompts.per_dimension; got null"):
        vbench_prompts(path, "prompts.per_dimension=1")


def test_per_dimension_one_covers_vbenchs_sixteen_dimensions_with_eleven_prompts():
    """The smoke test of the whole suite the docs give: one video per prompt, every dimension scored once."""
    pytest.importorskip("vbench")
    from stas.evaluation.scores import DIMENSIONS
    from stas.prompts import vbench_info_path

    prompts = load_prompts(compose(["prompts=vbench", "prompts.per_dimension=1"]).prompts)
    info = {entry["prompt_en"]: entry["dimension"] for entry in json.loads(vbench_info_path().read_text())}
    covered = [dimension for prompt in prompts for dimension in info[prompt]]
    assert len(prompts) == 11 and sorted(covered) == sorted(DIMENSIONS)


@pytest.mark.parametrize("overrides, message", [
    (["prompts.per_dimension=0"], r"prompts.per_dimension=0 must be >= 1"),
    (["prompts=demo", "prompts.per_dimension=1"], r"prompts.per_dimension=1 selects VBench prompts by dimension: it "
                                                  r"needs prompts=vbench, not prompts.source=demo"),
])
def test_per_dimension_is_checked(overrides, message):
    from stas.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(compose(["prompts=vbench", *overrides]))


@pytest.mark.slow
def test_bad_prompt_files_fail_in_the_cli_before_anything_is_written(cli, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a cat\n\xff a dog\n")
    info = tmp_path / "info.json"
    info.write_text('[{"prompt": "a cat"}]')
    for source, message in ((["prompts=file", f"prompts.path={path}"],
                             f"prompts.path='{path}': line 2 is not UTF-8 text (byte 0xff at column 1)"),
                            (["prompts=vbench", f"prompts.path={info}"],
                             f"prompts.path='{info}': entry 0 must be an object with a string 'prompt_en'")):
        result = cli("stas.run", *source, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"stas.run: error: {message}") and len(result.stderr.splitlines()) == 1
        assert not (tmp_path / "run" / "run_identity.yaml").exists()


# ------------------------------------------------------------------------------- prompt files with images


def prompt_set(path):
    from stas.prompts import load_prompt_set

    return load_prompt_set(compose(["prompts=file", f"prompts.path={path}"]).prompts)


def write_png(path, color=(200, 80, 40)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), color).save(path)
    return path


def test_a_prompt_file_gives_images_after_a_tab_relative_to_its_folder(tmp_path):
    import hashlib

    fox = write_png(tmp_path / "pics" / "fox.png")
    owl = write_png(tmp_path / "elsewhere" / "owl.png", (10, 20, 30))
    path = tmp_path / "prompts.txt"
    path.write_text(f"a cat\n\na fox in snow\tpics/fox.png\n  an owl \t {owl} \r\na dog\t\n"
                    "a fox in snow\tpics/fox.png\n", encoding="utf-8")
    prompts = prompt_set(path)
    assert [(p.text, p.image) for p in prompts] == [("a cat", None), ("a fox in snow", "pics/fox.png"),
                                                    ("an owl", str(owl)), ("a dog", None)]  # the repeat is dropped
    assert prompts[1].image_file == str(fox) and prompts[2].image_file == str(owl)
    assert prompts[1].image_sha256 == hashlib.sha256(fox.read_bytes()).hexdigest()
    assert prompts[1].where == f"prompts.path='{path}': line 3"
    assert file_prompts(path) == ["a cat", "a fox in snow", "an owl", "a dog"]


def test_a_json_prompt_file_gives_prompts_and_images(tmp_path):
    write_png(tmp_path / "fox.png")
    path = tmp_path / "prompts.JSON"
    path.write_text(json.dumps([{"prompt": "a fox in snow", "image": "fox.png"}, {"prompt": "a cat"},
                                {"prompt": "a dog", "image": None}, {"prompt": "a fox in snow", "image": "./fox.png"}]))
    prompts = prompt_set(path)  # the last entry is the first one again (the same bytes): dropped
    assert [(p.text, p.image) for p in prompts] == [("a fox in snow", "fox.png"), ("a cat", None), ("a dog", None)]
    assert prompts[2].where == f"prompts.path='{path}': entry 2"
    from stas.prompts import make_items

    items = make_items(prompts, 1, 0)
    assert [item.filename for item in items] == ["a fox in snow-0.mp4", "a cat-0.mp4", "a dog-0.mp4"]  # VBench's
    assert items[0].manifest_row()["image_sha256"] == prompts[0].image_sha256 and items[0].image_file == str(
        tmp_path / "fox.png")
    assert "image" not in items[1].manifest_row()  # text-only rows stay as they were


@pytest.mark.parametrize("second", ["owl.png", None], ids=["another_image", "no_image"])
def test_one_prompt_with_two_images_is_refused(tmp_path, second):
    write_png(tmp_path / "fox.png")
    write_png(tmp_path / "owl.png", (1, 2, 3))
    path = tmp_path / "prompts.txt"
    path.write_text(f"a fox in snow\tfox.png\na cat\na fox in snow{'' if second is None else chr(9) + second}\n")
    other = "no image" if second is None else f"image '{second}'"
    with pytest.raises(ConfigError, match="^" + re.escape(
            f"prompts.path='{path}': line 1 and line 3 give the prompt 'a fox in snow' with image 'fox.png' and with "
            f"{other}; a prompt starts from one image")):
        prompt_set(path)


BAD_IMAGE_FILES = [
    ("a fox\tmissing.png\n", "line 1: image 'missing.png' ({folder}/missing.png): no such file; image paths are "
                             "relative to the prompt file's folder, or absolute"),
    ("a cat\na fox\tpics\n", "line 2: image 'pics' ({folder}/pics): cannot be read: Is a directory"),
    ("a fox\tnotes.txt\n", "line 1: image 'notes.txt' ({folder}/notes.txt): is not an image Pillow can read"),
    ("a fox\tfox.png\textra\n", "line 1 has 2 tabs; the format is one prompt a line, optionally prompt<TAB>image path "
                                "(one tab, between the prompt and the image path)"),
    ("\tfox.png\n", "line 1 gives an image ('fox.png') but no prompt before the tab"),
]


@pytest.mark.parametrize("text,message", BAD_IMAGE_FILES,
                         ids=["missing", "directory", "not_image", "tabs", "no_prompt"])
def test_a_bad_image_in_a_prompt_file_names_the_file_line_and_what_is_allowed(tmp_path, text, message):
    write_png(tmp_path / "fox.png")
    (tmp_path / "pics").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    expected = f"prompts.path='{path}': " + message.format(folder=tmp_path)
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        prompt_set(path)


BAD_JSON_FILES = [
    ({"prompt": "a cat"}, "must be a JSON list of objects with \"prompt\" and, optionally, \"image\", not a dict"),
    (["a cat"], "entry 0 must be an object with a non-empty string \"prompt\" (and, optionally, an \"image\" path), "
                "got \"a cat\""),
    ([{"prompt": " "}], "entry 0 must be an object with a non-empty string \"prompt\""),
    ([{"prompt": "a cat", "img": "fox.png"}], "entry 0 has key(s) 'img'; allowed: 'prompt', 'image'"),
    ([{"prompt": "a cat", "image": 3}], "entry 0: \"image\" must be a path (a non-empty string) or null, got 3"),
    ([{"prompt": "a cat"}, {"prompt": "a fox", "image": "gone.png"}], "entry 1: image 'gone.png' ({folder}/gone.png): "
                                                                      "no such file"),
]


@pytest.mark.parametrize("entries,message", BAD_JSON_FILES,
                         ids=["dict", "string", "empty", "key", "image_type", "missing"])
def test_a_bad_json_prompt_file_names_the_file_entry_and_what_is_allowed(tmp_path, entries, message):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(entries))
    expected = f"prompts.path='{path}': " + message.format(folder=tmp_path)
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        prompt_set(path)
    path.write_text("[{\"prompt\": \"a cat\",}]")
    with pytest.raises(ConfigError, match=r"is not valid JSON: Expecting property name"):
        prompt_set(path)
