"""Image-to-video on Wan2.2-TI2V's tiny twin: stas's loop with an image gives diffusers' WanImageToVideoPipeline's
frames bit for bit, the image really is latent frame 0 (the first-frame tokens, at timestep 0), steering steers the
same tokens with an image, and text-only backbones refuse one."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image

from stas.backbones import BackboneError
from stas.config import ConfigError
from stas.core.layout import TokenLayout
from stas.generation import load_image, make_loop, make_steerer, run_items, run_pipeline
from stas.loop import denoise, make_guider
from stas.prompts import Item

from conftest import compose

STEPS = 4  # the default window [0, 0.4) steers steps 0 and 1
PROMPT = "a red fox runs through fresh snow"


def write_image(path, seed: int, size=(150, 100)):
    """A random RGB image, not of the video's size (the pipelines resize it)."""
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [write_image(folder / f"image{seed}.png", seed) for seed in (0, 1)]


def setup(tiny_pipelines, twin="tiny_wan22", *overrides):
    _, backbone, pipe = tiny_pipelines[twin]
    cfg = compose([f"model={twin}", "logger=none", f"model.steps={STEPS}", *overrides])
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    return cfg, backbone, pipe, layout, backbone.pipeline_kwargs(cfg.model)


def item_with(image=None) -> Item:
    return Item(0, PROMPT, 0, 3, None if image is None else image.name, None if image is None else str(image), None)


def i2v_pipeline(pipe):
    """diffusers' own image-to-video pipeline around the tiny twin's components (expand_timesteps, as Wan2.2-TI2V's
    model_index sets it; the tiny transformer has no image_dim, so no CLIP image encoder is needed, as for the 5B)."""
    from diffusers import WanImageToVideoPipeline

    i2v = WanImageToVideoPipeline(**pipe.components, expand_timesteps=True)
    i2v.set_progress_bar_config(disable=True)
    return i2v


def frames_of(pipe, kwargs, layout, loop, item, steerer=None):
    """Float frames (and the steering record) of `item` through `loop`; loop None: `pipe(image=..., ...)`."""
    with steerer.attach(pipe.transformer) if steerer is not None else nullcontext():
        frames = np.asarray(run_pipeline(pipe, item, kwargs, steerer, layout, loop).frames[0])
        record = None if steerer is None else json.dumps(steerer.record(), sort_keys=True)
    return frames, record


@pytest.mark.parametrize("cfg_on", [True, False], ids=["cfg", "no_cfg"])
def test_loop_with_an_image_is_diffusers_image_to_video_pipeline_bit_for_bit(tiny_pipelines, images, cfg_on):
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, "tiny_wan22",
                                                *([] if cfg_on else ["model.guidance_scale=1"]))
    item = item_with(images[0])
    expected, _ = frames_of(i2v_pipeline(pipe), kwargs, layout, None, item)
    frames, _ = frames_of(pipe, kwargs, layout, make_loop(cfg, backbone), item)
    assert frames.dtype == np.float32 and frames.shape == expected.shape == (cfg.model.num_frames, 128, 192, 3)
    assert np.array_equal(frames, expected)
    text_only, _ = frames_of(pipe, kwargs, layout, make_loop(cfg, backbone), item_with(None))
    assert not np.array_equal(frames, text_only)  # the image is used, not dropped


def encoded_image(pipe, path, height, width) -> torch.Tensor:
    """The image's latent as Wan2.2's VAE encodes it (mode of its distribution), normalised: (1, 48, 1, h, w)."""
    vae = pipe.vae
    pixels = pipe.video_processor.preprocess(load_image(str(path)), height=height, width=width).unsqueeze(2)
    latent = vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    return (latent - mean) * (1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1))


def test_latent_frame_0_is_the_encoded_image_and_another_image_changes_the_video(tiny_pipelines, images):
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines)
    latent_kwargs = {**kwargs, "output_type": "latent"}
    loop = make_loop(cfg, backbone)
    with torch.inference_mode():
        latents = [run_pipeline(pipe, item_with(image), latent_kwargs, None, layout, loop).frames for image in images]
        encoded = [encoded_image(pipe, image, cfg.model.height, cfg.model.width) for image in images]
        text_only = run_pipeline(pipe, item_with(None), latent_kwargs, None, layout, loop).frames
    for latent, image_latent in zip(latents, encoded):
        assert latent.shape[2] == layout.frames and image_latent.shape[2] == 1
        assert torch.equal(latent[:, :, :1], image_latent)  # conditioning happened: frame 0 is the image
    assert not torch.equal(text_only[:, :, :1], encoded[0])
    assert not torch.equal(encoded[0], encoded[1])
    for frame in range(1, layout.frames):  # the denoised frames follow the image
        assert not torch.equal(latents[0][:, :, frame], latents[1][:, :, frame])
    frames = [frames_of(pipe, kwargs, layout, loop, item_with(image))[0] for image in images]
    for pixel_frame in range(cfg.model.num_frames):  # every frame of the video changes with the image
        assert not np.array_equal(frames[0][pixel_frame], frames[1][pixel_frame])


def test_first_frame_tokens_are_the_image_at_timestep_0(tiny_pipelines, images):
    """Every transformer call gets latent frame 0 as the encoded image, and timestep 0 on exactly the tokens the
    layout calls first_frame (frame-major order: the first H*W tokens); the token grid is the text-to-video one."""
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines)
    encoded = encoded_image(pipe, images[0], cfg.model.height, cfg.model.width)
    first_frame = layout.mask("first_frame")
    calls = []

    def look(module, args, call_kwargs):
        hidden, timestep = call_kwargs["hidden_states"], call_kwargs["timestep"]
        calls.append((TokenLayout(*backbone.grid_of_latents(hidden)), torch.equal(hidden[:, :, :1], encoded),
                      torch.equal(timestep == 0, first_frame.expand_as(timestep)), bool((timestep > 0).any())))

    handle = pipe.transformer.register_forward_pre_hook(look, with_kwargs=True)
    try:
        frames_of(pipe, {**kwargs, "output_type": "latent"}, layout, make_loop(cfg, backbone), item_with(images[0]))
    finally:
        handle.remove()
    assert len(calls) == 2 * STEPS
    assert all(call == (layout, True, True, True) for call in calls)
    assert int(first_frame.sum()) == layout.tokens_per_frame and bool(first_frame[: layout.tokens_per_frame].all())


def test_steering_steers_the_same_tokens_with_an_image(tiny_pipelines, images):
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, "tiny_wan22", "steer=stas")
    steerer, loop = make_steerer(cfg, backbone), make_loop(cfg, backbone)
    steered, record = frames_of(pipe, kwargs, layout, loop, item_with(images[0]), steerer)
    _, text_record = frames_of(pipe, kwargs, layout, loop, item_with(None), steerer)
    vanilla, _ = frames_of(pipe, kwargs, layout, loop, item_with(images[0]))
    record, text_record = json.loads(record), json.loads(text_record)
    assert record["values_steered"] > 0 and not np.array_equal(steered, vanilla)  # it steers with an image
    for key in ("layers", "steps", "branches", "hook_calls", "tokens", "tokens_total"):  # the same regions and calls
        assert record[key] == text_record[key], key
    assert record["steps"] == [0, 1]
    # diffusers' I2V pipeline with the same hooks (counted calls, no announcements): the same frames and record
    expected, expected_record = frames_of(i2v_pipeline(pipe), kwargs, layout, None, item_with(images[0]), steerer)
    assert np.array_equal(steered, expected) and json.loads(expected_record) == record


def test_apply_stas_on_a_users_image_to_video_pipeline_equals_stas_run(tiny_pipelines, images):
    """stas.apply_stas on WanImageToVideoPipeline (Wan2.2-TI2V, expand_timesteps) called with an image: the frames
    stas's steered loop makes; Wan2.1's image pipeline (no expand_timesteps) is not taken for Wan2.2."""
    import stas
    from stas.backbones import backbone_of_pipeline

    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, "tiny_wan22", "steer=stas")
    i2v = i2v_pipeline(pipe)
    assert backbone_of_pipeline(i2v).family == "wan22"
    steerer = make_steerer(cfg, backbone)
    expected, record = frames_of(pipe, kwargs, layout, make_loop(cfg, backbone), item_with(images[0]), steerer)
    with stas.apply_stas(i2v) as steering:
        frames, _ = frames_of(i2v, kwargs, layout, None, item_with(images[0]))
        assert steering.record() == json.loads(record)
    assert np.array_equal(frames, expected)
    from diffusers import WanImageToVideoPipeline

    with pytest.raises(BackboneError, match="WanImageToVideoPipeline is no family stas knows"):
        backbone_of_pipeline(WanImageToVideoPipeline(**pipe.components))


def test_text_only_backbones_refuse_an_image(tiny_pipelines, images, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat on a mat\n{PROMPT}\t{images[0]}\n")
    for model in ("tiny_wan21", "tiny_cogvideox", "tiny_hunyuanvideo"):
        cfg = compose([f"model={model}", "logger=none", "prompts=file", f"prompts.path={prompts}"])
        with pytest.raises(ConfigError, match=rf"^prompts.path='{prompts}': line 2 gives an image "
                                              rf"\('{images[0]}'\), but model={model} \(family \w+\) generates from "
                                              r"text only; models that take an image: tiny_wan22, wan22_5b\. Remove"):
            run_items(cfg)
    cfg = compose(["model=tiny_wan22", "logger=none", "prompts=file", f"prompts.path={prompts}"])
    assert [item.image for item in run_items(cfg)] == [None, str(images[0])]
    for model in ("tiny_wan21", "tiny_cogvideox"):  # the library loop, given an image anyway, refuses it too
        cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, model)
        with pytest.raises(BackboneError, match=rf"^{model} generates from text only: it takes no image"):
            with torch.inference_mode():
                denoise(pipe, backbone, make_guider(cfg.guidance), prompt=PROMPT, image=load_image(str(images[0])),
                        generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.slow  # a whole run into a directory: generation, mp4s, records
def test_rows_and_manifest_record_the_image_and_a_changed_image_is_refused(tmp_path):
    import hashlib

    from stas.backbones import backbone_from_config
    from stas.generation import generate
    from stas.loggers import RunLogger
    from stas.rundir import claim_run_dir
    from stas.video import read_mp4

    image = write_image(tmp_path / "fox.png", 0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\tfox.png\na cat on a mat\n")
    cfg = compose(["model=tiny_wan22", "logger=none", "progress=false", "model.steps=2", "prompts=file",
                   f"prompts.path={prompts}", "steer=none"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest = [item.manifest_row() for item in run_items(cfg)]
    claim_run_dir(run_dir, cfg, manifest)
    with RunLogger(cfg, run_dir, "generate") as logger:
        generate(cfg, run_dir, backbone_from_config(cfg.model), logger)
    rows = [json.loads(line) for line in (run_dir / "generation.jsonl").read_text().splitlines()]
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert (rows[0]["image"], rows[0]["image_sha256"]) == ("fox.png", digest) and "image" not in rows[1]
    assert rows[0]["path"] == f"videos/{PROMPT}-0.mp4" and rows[1]["path"] == "videos/a cat on a mat-0.mp4"
    assert manifest[0]["image_sha256"] == digest and read_mp4(run_dir / rows[0]["path"]).shape[0] == 17
    write_image(image, 1)  # the same path, another image: not the run that was started
    with pytest.raises(ConfigError, match="was started with other prompts .* did the prompt file, or one of its "
                                          "images, change"):
        claim_run_dir(run_dir, cfg, [item.manifest_row() for item in run_items(cfg)])


def test_the_readme_example_prompt_files_load_on_the_tiny_twin():
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    assert "python -m stas.run model=tiny_wan22 prompts=file prompts.path=examples/i2v/prompts.txt" in readme
    loaded = []
    for name in ("prompts.txt", "prompts.json"):  # the two formats of the same prompts and images
        cfg = compose(["model=tiny_wan22", "logger=none", "prompts=file",
                       f"prompts.path={REPO / 'examples' / 'i2v' / name}"])
        loaded.append([(item.prompt, item.image, item.image_sha256) for item in run_items(cfg)])
    assert loaded[0] == loaded[1] and [image for _, image, _ in loaded[0]] == ["fox.png", "sunset.png", None]
