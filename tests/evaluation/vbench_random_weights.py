"""Random-init weights in the real file formats VBench 0.1.5's dimensions load, for the integration suite
(tests/evaluation/test_vbench_full.py): each file is built with the constructor of the model that reads it (VBench's
third_party code, openai-clip, pyiqa) and saved the way the released file is, so VBench's own loading code runs
unchanged. Scores computed with them are meaningless; the code paths are the real ones.

    python vbench_random_weights.py CACHE_DIR DIMENSION

writes every file DIMENSION reads from VBench's cache (stas's CACHE_FILES) that CACHE_DIR does not hold yet. It runs
in the interpreter that will run the dimension, since the model code is imported from there (the separate
environment's for human_action: VBench's UMT needs timm 1.0.12); so it imports only the standard library, torch and
the model packages, and reads CACHE_FILES from stas's worker script by path. subject_consistency's DINO code is
copied from a local clone of facebookresearch/dino ($STAS_DINO_REPO). The dimensions that load bert-base-uncased
(Tag2Text's and GRiT's, stas's HUB_DIMENSIONS) get it in a Hugging Face hub cache inside CACHE_DIR (hub_environment),
built first: config, random-init weights, a synthetic WordPiece vocabulary. GRiT's builder needs detectron2.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import string
import sys
from pathlib import Path

SEED = 0
DINO_CLONE = "STAS_DINO_REPO"  # a local clone of github.com/facebookresearch/dino (none can be made offline)
WORKER = Path(__file__).resolve().parents[2] / "stas" / "evaluation" / "vbench_worker.py"
# openai-clip's CLIP(...) arguments of OpenAI's releases (the shapes clip.model.build_model reads back).
CLIP_ARCHITECTURES = {
    "ViT-B-32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                     transformer_layers=12),
    "ViT-L-14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                     transformer_layers=12),
}


BERT = "bert-base-uncased"
# bert-base-uncased's config.json as released (BERT-base: 12 layers of width 768, a vocabulary of 30522 word pieces).
BERT_CONFIG = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
               "gradient_checkpointing": False, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
               "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
               "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12,
               "pad_token_id": 0, "position_embedding_type": "absolute", "transformers_version": "4.6.0.dev0",
               "type_vocab_size": 2, "use_cache": True, "vocab_size": 30522}
BERT_TOKENIZER_CONFIG = {"do_lower_case": True, "model_max_length": 512}
# The snapshot's name in the hub cache: no commit of the real repository holds these files, so a fixed made-up one.
BERT_REVISION = hashlib.sha1(b"stas random-init bert-base-uncased").hexdigest()


def load_worker():
    spec = importlib.util.spec_from_file_location("stas_vbench_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker


def cache_files(dimension: str) -> list[str]:
    return [relative for relative, _ in load_worker().CACHE_FILES[dimension]]


def hub_environment(cache: Path) -> dict[str, str]:
    """The variables that point Hugging Face loading at the hub cache the suite builds inside `cache` (never at
    ~/.cache/huggingface): transformers 4.33 (the separate environment) reads only HF_HOME, huggingface_hub
    HF_HUB_CACHE first."""
    home = cache / "huggingface"
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}


def bert_vocabulary() -> list[str]:
    """Stands in for bert-base-uncased's vocab.txt, which cannot be downloaded here: the release's size (30522) with
    its special tokens at their ids ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, [unusedN] at the ids
    around them up to 998, as released), then single characters and word pieces (every lowercase letter pair and
    triple, also as `##` continuations), so that every lowercase prompt splits into pieces instead of [UNK]. Word ids
    differ from the release's, which random weights make irrelevant."""
    unused = (f"[unused{index}]" for index in itertools.count())
    specials = ["[PAD]", *itertools.islice(unused, 99), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                *itertools.islice(unused, 999 - 104)]
    characters = string.punctuation + string.digits + string.ascii_lowercase
    letters = string.ascii_lowercase
    words = [*characters, *("##" + character for character in characters)]
    for length in (2, 3):
        combinations = ["".join(picked) for picked in itertools.product(letters, repeat=length)]
        words += [*combinations, *("##" + combination for combination in combinations)]
    return specials + words[:BERT_CONFIG["vocab_size"] - len(specials)]


def write_bert(hub: Path) -> Path | None:
    """bert-base-uncased in the hub cache's layout (models--bert-base-uncased/snapshots/<rev>/ and refs/main), so that
    from_pretrained("bert-base-uncased") finds it offline: the released config, tokenizer config, the stand-in
    vocabulary, and random-init weights of BertForPreTraining (the released file's keys: bert.*, cls.*) as
    model.safetensors. Returns the snapshot folder, or None when it is complete already (refs/main is written last)."""
    import torch
    from safetensors.torch import save_model
    from transformers import BertConfig, BertForPreTraining

    repository = hub / f"models--{BERT}"
    reference = repository / "refs" / "main"
    snapshot = repository / "snapshots" / BERT_REVISION
    if reference.is_file():
        return None
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text(json.dumps(BERT_CONFIG, indent=2))
    (snapshot / "tokenizer_config.json").write_text(json.dumps(BERT_TOKENIZER_CONFIG))
    (snapshot / "vocab.txt").write_text("\n".join(bert_vocabulary()) + "\n")
    torch.manual_seed(SEED)
    model = BertForPreTraining(BertConfig.from_json_file(snapshot / "config.json"))
    # save_model stores the output embedding tied to the input one once, as the release does (save_file refuses
    # tensors that share memory); transformers reads only files whose metadata says format "pt".
    save_model(model, str(snapshot / "model.safetensors"), metadata={"format": "pt"})
    reference.parent.mkdir(parents=True, exist_ok=True)
    reference.write_text(BERT_REVISION)
    return snapshot


def write_clip(path: Path) -> None:
    """OpenAI's release format: a TorchScript archive (clip.load tries torch.jit.load first and rebuilds the model
    from the archive's state_dict; a plain state-dict file fails under torch 2.14), fp16 like the release."""
    import torch
    from clip.model import CLIP

    architecture = CLIP_ARCHITECTURES[path.stem]
    model = CLIP(**architecture).eval()
    image = torch.zeros(1, 3, architecture["image_resolution"], architecture["image_resolution"])
    text = torch.zeros(1, architecture["context_length"], dtype=torch.long)
    with torch.no_grad():
        archive = torch.jit.trace(model, (image, text), check_trace=False)
    torch.jit.save(archive.half(), str(path))


def write_aesthetic_head(path: Path) -> None:
    """LAION's aesthetic predictor: the state dict of nn.Linear(768, 1) on CLIP ViT-L/14 embeddings."""
    import torch

    torch.save(torch.nn.Linear(768, 1).state_dict(), path)


def write_musiq(path: Path) -> None:
    """pyiqa's MUSIQ (as VBench builds it, one score per image: the SPAQ head), its state dict."""
    import torch
    from pyiqa.archs.musiq_arch import MUSIQ

    torch.save(MUSIQ(pretrained=False).state_dict(), path)


def write_amt_s(path: Path) -> None:
    """AMT-S, built from VBench's own config; the release file is {"state_dict": ...}."""
    import torch
    import vbench
    from omegaconf import OmegaConf
    from vbench.third_party.amt.utils.build_utils import build_from_cfg

    config = Path(vbench.__file__).parent / "third_party" / "amt" / "cfgs" / "AMT-S.yaml"
    torch.save({"state_dict": build_from_cfg(OmegaConf.load(config).network).state_dict()}, path)


def write_raft(path: Path) -> None:
    """RAFT (full, not small), saved from DataParallel like the release: keys prefixed `module.`."""
    import torch
    from easydict import EasyDict
    from vbench.third_party.RAFT.core.raft import RAFT

    model = RAFT(EasyDict(small=False, mixed_precision=False, alternate_corr=False))
    torch.save({f"module.{key}": value for key, value in model.state_dict().items()}, path)


def write_viclip(path: Path) -> None:
    """VBench's ViCLIP as {"model": state dict}. ViCLIP leaves three parameters as torch.empty (the checkpoint fills
    them): they get seeded values here, so that no uninitialised memory (NaN, huge values) reaches the scores."""
    import torch
    from vbench.third_party.ViCLIP.simple_tokenizer import SimpleTokenizer
    from vbench.third_party.ViCLIP.viclip import ViCLIP

    model = ViCLIP(tokenizer=SimpleTokenizer(str(path.parent / "bpe_simple_vocab_16e6.txt.gz")), pretrain=None)
    with torch.no_grad():
        for parameter in (model.vision_encoder.proj, model.text_encoder.text_projection,
                          model.text_encoder.positional_embedding):
            torch.nn.init.normal_(parameter, std=parameter.shape[0] ** -0.5)
    torch.save({"model": model.state_dict()}, path)


def copy_bpe_vocabulary(path: Path) -> None:
    """ViCLIP's BPE vocabulary is the data file openai-clip ships (what `--vbench-weights` copies too)."""
    import clip

    shutil.copyfile(Path(clip.__file__).parent / path.name, path)


def write_umt(path: Path) -> None:
    """VBench's UMT ViT-L/16 (Kinetics-400 head), built as human_action.py builds it; the release file is the bare
    state dict."""
    import torch
    from timm.models import create_model
    from vbench.third_party.umt.models.modeling_finetune import vit_large_patch16_224  # registers it with timm

    model = create_model(vit_large_patch16_224.__name__, pretrained=False, num_classes=400, all_frames=16,
                         tubelet_size=1, use_learnable_pos_emb=False, use_mean_pooling=True, init_scale=0.001)
    torch.save(model.state_dict(), path)


def copy_dino_repository(path: Path) -> None:
    """VBench loads DINO with torch.hub from a clone of facebookresearch/dino in its cache: the files of the clone
    at $STAS_DINO_REPO (hubconf.py, vision_transformer.py, ...)."""
    shutil.copytree(os.environ[DINO_CLONE], path.parent, ignore=shutil.ignore_patterns(".git"), dirs_exist_ok=True)


def write_dino(path: Path) -> None:
    """DINO ViT-B/16 built by the clone's own vision_transformer.py (as its hubconf builds dino_vitb16), the release's
    bare state dict; also where the hubconf loads it from: torch's hub cache (TORCH_HOME), checkpoints/."""
    import torch

    sys.path.insert(0, str(path.parent / "facebookresearch_dino_main"))
    import vision_transformer

    torch.save(vision_transformer.vit_base(patch_size=16, num_classes=0).state_dict(), path)
    hub_copy = Path(torch.hub.get_dir()) / "checkpoints" / path.name
    hub_copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, hub_copy)


def write_tag2text(path: Path) -> None:
    """VBench's Tag2Text captioner with the Swin-B encoder at 384 px (as scene.py builds it), {"model": state dict}.
    Its constructor loads bert-base-uncased from the Hugging Face cache (written first)."""
    import torch
    from vbench.third_party.tag2Text.tag2text import tag2text_caption

    torch.save({"model": tag2text_caption(image_size=384, vit="swin_b").state_dict()}, path)


def write_grit(path: Path) -> None:
    """VBench's GRiT (ViT-B, DenseCap and ObjectDet heads) built by detectron2 from VBench's own config, as its
    predictor builds it before loading the file; detectron2's checkpoint format, {"model": state dict}. Its
    constructor loads the bert-base-uncased tokenizer (written first)."""
    import torch
    from detectron2.modeling import build_model
    from vbench.third_party.grit_src.image_dense_captions import get_parser, setup_cfg

    model = build_model(setup_cfg(get_parser(torch.device("cpu"), str(path))))
    torch.save({"model": model.state_dict()}, path)


# One builder per file VBench reads (path under the cache), in the order they are built: the BPE vocabulary before
# ViCLIP's weights, DINO's code before its weights.
BUILDERS = {
    "clip_model/ViT-B-32.pt": write_clip,
    "clip_model/ViT-L-14.pt": write_clip,
    "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth": write_aesthetic_head,
    "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth": write_musiq,
    "amt_model/amt-s.pth": write_amt_s,
    "raft_model/models/raft-things.pth": write_raft,
    "ViCLIP/bpe_simple_vocab_16e6.txt.gz": copy_bpe_vocabulary,
    "ViCLIP/ViClip-InternVid-10M-FLT.pth": write_viclip,
    "umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth": write_umt,
    "dino_model/facebookresearch_dino_main/hubconf.py": copy_dino_repository,
    "dino_model/dino_vitbase16_pretrain.pth": write_dino,
    "caption_model/tag2text_swin_14m.pth": write_tag2text,
    "grit_model/grit_b_densecap_objectdet.pth": write_grit,
}


def write_weights(cache: Path, dimension: str) -> list[Path]:
    """Build the files `dimension` reads that `cache` lacks (bert-base-uncased first, for the dimensions that load
    it); returns the ones written. KeyError: a file without a builder here."""
    import torch

    # vbench reads its cache directory at import, and ViCLIP's tokenizer fetches its vocabulary there when imported;
    # the Hugging Face variables are read when transformers is imported. Everything is built offline.
    os.environ.update(VBENCH_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", **hub_environment(cache))
    written = []
    if dimension in load_worker().HUB_DIMENSIONS:
        written += filter(None, [write_bert(Path(hub_environment(cache)["HF_HUB_CACHE"]))])
    order = list(BUILDERS)
    for relative in sorted(cache_files(dimension), key=lambda name: order.index(name) if name in BUILDERS else -1):
        path = cache / relative
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(SEED)
        try:
            BUILDERS[relative](path)
        except BaseException:
            path.unlink(missing_ok=True)  # a half-written file would be taken for a release file next time
            raise
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_weights(Path(sys.argv[1]), sys.argv[2]):
        print(written_path)
