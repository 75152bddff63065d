"""HunyuanVideo (family hunyuanvideo: 20 double-stream + 40 single-stream blocks, guidance-distilled): the token grid
the transformer really sees, verified by planting a value in the latents at a known (latent frame, row, column) and
finding the token of the real transformer's patch embedding it lands on; bad sizes; the twin tiny_hunyuanvideo
sampling as `pipe(...)` does, bit for bit, with true CFG off and on; steering that reaches both block lists; and CFG
decided by true_cfg_scale, never by the embedded guidance_scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stas.backbones import backbone_of_pipeline, get_backbone
from stas.config import ConfigError, load_group_option, validate
from stas.core.layout import TokenLayout
from stas.generation import make_loop, make_steerer, run_pipeline
from stas.loggers import RunLogger
from stas.ma.analysis import analyze
from stas.prompts import Item

from conftest import build_twin, compose, landing_tokens

TWIN = "tiny_hunyuanvideo"
ITEM = Item(0, "a red fox runs through fresh snow", 0, 3)
TRUE_CFG = "model.true_cfg_scale=4.0"  # two branches: cond, then uncond on the negative prompt


def embed_transformer():
    """A real HunyuanVideoTransformer3DModel (patch 1 x 2 x 2, 16 latent channels) at a small width; its patch
    embedding is all the token order depends on."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=8, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6)).eval()


@pytest.mark.parametrize("model", ["hunyuanvideo", TWIN])
def test_a_planted_latent_lands_on_the_token_the_layout_gives(model):
    cfg = load_group_option("model", model)
    backbone = get_backbone(model)
    height, width, frames = cfg.height, cfg.width, cfg.num_frames
    layout = TokenLayout.for_video(backbone, height, width, frames)
    latent_frames, rows, columns = (frames - 1) // 4 + 1, height // 8, width // 8
    latents = torch.randn(1, 16, latent_frames, rows, columns, generator=torch.Generator().manual_seed(0))
    assert backbone.grid_of_latents(latents) == (layout.frames, layout.height, layout.width)
    first, boundary = layout.mask("first_frame"), layout.mask("boundary", 1, "rows")
    transformer = embed_transformer()
    for frame, row, column in [(0, 0, 0), (0, rows - 1, columns - 1), (1, 3, 5), (latent_frames - 1, rows // 2, 1),
                               (2, 0, columns // 2), (latent_frames - 1, rows - 1, 0)]:
        token = (frame * layout.height + row // 2) * layout.width + column // 2
        assert landing_tokens(transformer.x_embedder, latents, (frame, row, column), frame_axis=2) == [token]
        assert bool(first[token]) == (frame == 0)
        assert bool(boundary[token]) == (frame > 0 and row // 2 in (0, layout.height - 1))


def test_the_published_grid_and_the_two_block_lists():
    backbone = get_backbone("hunyuanvideo")
    assert backbone.latent_grid(720, 1280, 129) == (33, 45, 80)  # 118,800 video tokens
    assert backbone.latent_grid(544, 960, 129) == (33, 34, 60)
    assert (backbone.num_layers, backbone.hidden_dim) == (60, 3072)
    transformer = embed_transformer()
    blocks = backbone.blocks(transformer)
    assert list(blocks) == [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


@pytest.mark.parametrize("overrides,message", [
    (["model.num_frames=128"], r"model.num_frames=128 must be 4k\+1 \(e.g. 17\) for a VAE compressing time 4x"),
    (["model.width=1288"], r"model.width=1288 must be a positive multiple of 16 for hunyuanvideo"),
    (["model.height=712"], r"model.height=712 must be a positive multiple of 16"),
    (["model.true_cfg_scale=101"], r"model.true_cfg_scale=101.0 .*100"),
])
def test_bad_sizes_get_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["model=hunyuanvideo", "logger=none", *overrides]))


def test_true_cfg_scale_is_refused_where_the_pipeline_has_none():
    with pytest.raises(ConfigError, match=r"model.true_cfg_scale=3.0 is HunyuanVideo's; tiny_wan21's pipeline"):
        validate(compose(["model=tiny_wan21", "logger=none", "model.true_cfg_scale=3"]))


@pytest.fixture(scope="module")
def twin():
    return build_twin(TWIN)[1:]


def sample(twin, *overrides, loop: bool):
    """(frames, steering record) of ITEM through stas's loop or `pipe(...)`, 3 steps, STAS attached."""
    backbone, pipe = twin
    cfg = compose([f"model={TWIN}", "logger=none", "model.steps=3", "steer=stas", *overrides])
    steerer = make_steerer(cfg, backbone)
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    kwargs = backbone.pipeline_kwargs(cfg.model)
    with steerer.attach(backbone.experts(pipe)):
        output = run_pipeline(pipe, ITEM, kwargs, steerer, layout, make_loop(cfg, backbone) if loop else None)
        return np.asarray(output.frames[0]), steerer.record()


def test_the_twin_is_recognised_and_its_prompt_template_is_cropped_as_with_llama3(twin):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    backbone, pipe = twin
    assert backbone_of_pipeline(pipe).family == "hunyuanvideo" and backbone_of_pipeline(pipe).num_layers == 4
    system = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(pipe.tokenizer(system).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    # after the crop the prompt's own tokens reach the transformer: two prompts give two embeddings
    embeds = [pipe.encode_prompt(prompt, max_sequence_length=32)[0] for prompt in ("a red fox", "a blue whale")]
    assert not torch.equal(*embeds)


@pytest.mark.parametrize("true_cfg", [False, True], ids=["distilled", "true_cfg"])
def test_the_owned_loop_steers_as_the_pipeline_bit_for_bit(twin, true_cfg):
    """With STAS attached (without it: tests/test_owned_loop.py): the same frames and record."""
    overrides = [TRUE_CFG] if true_cfg else []
    expected, expected_record = sample(twin, *overrides, loop=False)
    frames, record = sample(twin, *overrides, loop=True)
    assert np.array_equal(frames, expected) and record == expected_record
    # the step in the window, every block of both lists, one branch without true CFG, two with it
    assert record["steps"] == [0] and record["layers"] == [0, 1, 2, 3]
    assert record["branches"] == (["cond", "uncond"] if true_cfg else ["cond"])
    assert record["hook_calls"] == 4 * (2 if true_cfg else 1)


def test_guidance_scale_above_one_without_true_cfg_runs_and_steers_one_branch(twin):
    backbone, pipe = twin
    cfg = compose([f"model={TWIN}", "logger=none", "model.guidance_scale=6", "model.true_cfg_scale=1"])
    kwargs = backbone.pipeline_kwargs(cfg.model)
    assert kwargs["guidance_scale"] == 6 and not backbone.uses_cfg(kwargs)
    assert backbone.uses_cfg({**kwargs, "true_cfg_scale": 4.0})
    assert not backbone.uses_cfg({**kwargs, "true_cfg_scale": 4.0, "negative_prompt": None})  # as the pipeline
    assert make_loop(cfg, backbone).steps_matching_nfe(10, backbone.uses_cfg(kwargs)) == 10
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        float(kwargs["guidance"][0])), with_kwargs=True)
    try:
        _, record = sample(twin, "model.guidance_scale=6", loop=True)
    finally:
        handle.remove()
    assert calls == [6000.0] * 3  # one call a step, the guidance embedded
    assert record["branches"] == ["cond"]
    with pytest.raises(ConfigError, match=r"steer.branches=uncond, but model tiny_hunyuanvideo runs no classifier-"
                                          r"free guidance .*model.true_cfg_scale=1.0: two-branch CFG needs > 1"):
        validate(compose([f"model={TWIN}", "logger=none", "steer.branches=uncond"]))


def channel_ratios(block, seen: list):
    """A hook after the steering hooks: |channel 17| / |channel 5| on the first-frame tokens of a block's output
    (planted at 0.8; steered to the layer's largest MA magnitude, 1.0)."""
    def hook(module, args, output):
        video = output[0][0, :24]  # the twin's 4 x 6 first-frame tokens
        seen.append(float((video[:, 17].abs() / video[:, 5].abs()).mean()))
    return block.register_forward_hook(hook)


def test_steering_reaches_both_block_lists(twin):
    backbone, pipe = twin
    transformer = pipe.transformer
    watched = {0: transformer.transformer_blocks[0], 1: transformer.transformer_blocks[1],
               2: transformer.single_transformer_blocks[0], 3: transformer.single_transformer_blocks[1]}
    cfg = compose([f"model={TWIN}", "logger=none", "model.steps=1", "steer=stas", "steer.layers=[1,2]",
                   "steer.window.unit=steps", "steer.window.end=1"])
    steerer = make_steerer(cfg, backbone)
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    with steerer.attach(backbone.experts(pipe)):
        ratios = {layer: [] for layer in watched}
        handles = [channel_ratios(block, ratios[layer]) for layer, block in watched.items()]
        try:
            run_pipeline(pipe, ITEM, backbone.pipeline_kwargs(cfg.model), steerer, layout, make_loop(cfg, backbone))
        finally:
            for handle in handles:
                handle.remove()
    # layer 1 (double-stream) and layer 2 (single-stream) steered; 0 and 3 as planted
    assert ratios[1] == pytest.approx([1.0]) and ratios[2] == pytest.approx([1.0])
    assert ratios[0] == pytest.approx([0.8]) and ratios[3] == pytest.approx([0.8])
    assert steerer.record()["layers"] == [1, 2]


def test_the_twin_analysis_finds_the_planted_channels_in_both_lists(twin, tmp_path):
    backbone, pipe = twin
    cfg = compose([f"model={TWIN}", "logger=none", "progress=false", "prompts.limit=3", "model.steps=3",
                   "analysis.plots=[]"], config_name="analyze")
    with RunLogger(cfg, tmp_path, job_type="analyze") as logger:
        summary = analyze(cfg, tmp_path, backbone, logger, pipe=pipe).summary
    assert summary["layout"]["frames"] == 5 and summary["branches"] == ["cond"]
    for layer in ("0", "1", "2", "3"):  # double-stream 0-1, single-stream 2-3
        assert summary["results"]["vanilla"]["layers"][layer]["massive"] == [5, 17, 26]
    assert summary["hierarchy"]["verdict"] == "holds"


@pytest.mark.parametrize("true_cfg", [False, True], ids=["distilled", "true_cfg"])
def test_apply_stas_tells_true_cfg_from_the_users_pipeline_call(twin, true_cfg):
    """The pipeline records neither true_cfg_scale nor the negative prompt: the call's second transformer call (at
    the first one's timestep: uncond) tells, and the frames and record are stas.run's."""
    import stas

    backbone, pipe = twin
    overrides = [TRUE_CFG] if true_cfg else []
    expected, expected_record = sample(twin, *overrides, loop=True)
    cfg = compose([f"model={TWIN}", "logger=none", "model.steps=3", *overrides])
    with stas.apply_stas(pipe) as steering, torch.inference_mode():
        frames = pipe(prompt=ITEM.prompt, generator=torch.Generator(device="cpu").manual_seed(ITEM.seed),
                      **backbone.pipeline_kwargs(cfg.model)).frames[0]
        record = steering.record()
    assert record["branches"] == (["cond", "uncond"] if true_cfg else ["cond"])
    assert np.array_equal(np.asarray(frames), expected) and record == expected_record


@pytest.mark.parametrize("guidance, layers, placed", [
    ("slg", [1], [("transformer_blocks", [1])]),  # the last double-stream block
    ("slg", [1, 2], [("transformer_blocks", [1]), ("single_transformer_blocks", [0])]),  # one in each list
    ("pag", [3], [("single_transformer_blocks", [1])]),  # the last single-stream block
])
def test_perturbed_pass_guidance_reaches_the_blocks_of_either_list(twin, guidance, layers, placed):
    """Layer indices count over both lists (as steer.layers does): each lands in its own list's LayerSkipConfig. In
    the perturbed pass a skipped block (slg skips the whole block) returns its input; no other block does, and no
    block of the cond and uncond passes."""
    backbone, pipe = twin
    key = "skip_layer_config.indices" if guidance == "slg" else "perturbed_guidance_layers"
    cfg = compose([f"model={TWIN}", "logger=none", "model.steps=3", "steer=none", TRUE_CFG, f"guidance={guidance}",
                   f"guidance.params.{key}={layers}"])
    validate(cfg)
    loop = make_loop(cfg, backbone)
    unchanged = []  # (call, block) where the block's video tokens came out as they went in

    def spy(index):
        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if torch.equal(backbone.video_tokens(output), hidden):
                unchanged.append((calls[0], index))
        return hook

    calls = [0]
    counter = pipe.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    handles = [block.register_forward_hook(spy(index), with_kwargs=True)
               for index, block in enumerate(backbone.blocks(pipe.transformer))]
    try:
        layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
        run_pipeline(pipe, ITEM, backbone.pipeline_kwargs(cfg.model), None, layout, loop)
    finally:
        for handle in [counter, *handles]:
            handle.remove()
    assert [(config.fqn, config.indices) for config in loop.guider.skip_layer_config] == placed
    # 3 steps: cond, uncond (calls 1, 2), then cond, uncond, perturbed at steps 1 and 2 (calls 5 and 8)
    assert loop.nfe == 8
    if guidance == "slg":
        assert unchanged == [(call, layer) for call in (5, 8) for layer in layers]
    else:  # identity attention maps change the block's output, but only in the perturbed pass
        assert all(call in (5, 8) for call, _ in unchanged)


def test_single_stream_blocks_are_refused_for_a_family_with_one_block_list():
    with pytest.raises(ConfigError, match=r"model.tiny.num_single_layers=2, but family wan21 has one block list"):
        validate(compose(["model=tiny_wan21", "logger=none", "model.tiny.num_single_layers=2", "model.num_layers=4"]))
