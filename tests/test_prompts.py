"""Prompt files and custom VBench JSON files: read exactly, refused with a one-line message naming file and line."""

import json

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
