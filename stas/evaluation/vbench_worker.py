"""Run VBench for stas, inside whatever Python has `vbench` installed (stdlib + vbench only: no stas import).

    python vbench_worker.py REQUEST.json

REQUEST is a JSON object; the answer is written as JSON to request["output"]. Actions:
- "probe": for each of request["dimensions"], what it still lacks here: weight files in VBench's cache (with where
  each comes from and how to place it), Python packages, or vbench itself. Cheap: imports nothing heavy.
- "evaluate": run one dimension (request["dimension"]) through VBench's own Python API in local mode (weights from
  the cache only) on the videos in request["videos_dir"], and return VBench's value and its per-video results,
  each with the weight VBench pools it with (frame pairs for the consistency dimensions, frames for the
  frame-counting ones, else 1), and for a dimension that leaves videos out by design (color: no object detected)
  why a video without a result has none.
stas checks every file VBench would otherwise fetch with wget or git clone before it calls VBench, so an offline
machine gets a message instead of a hanging download.
"""

import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

# Run as a script, Python puts this file's folder first on sys.path, where stas's own vbench.py would shadow the
# vbench package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

HF_MODELS = "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/"
CLIP_B32 = ("clip_model/ViT-B-32.pt", "https://openaipublic.azureedge.net/clip/models/"
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
CLIP_L14 = ("clip_model/ViT-L-14.pt", "https://openaipublic.azureedge.net/clip/models/"
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt")
GRIT = ("grit_model/grit_b_densecap_objectdet.pth",
        "https://datarelease.blob.core.windows.net/grit/models/grit_b_densecap_objectdet.pth")
VICLIP = [("ViCLIP/ViClip-InternVid-10M-FLT.pth", HF_MODELS + "ViClip-InternVid-10M-FLT.pth"),
          ("ViCLIP/bpe_simple_vocab_16e6.txt.gz",
           "https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz")]
DINO_REPO = "dino_model/facebookresearch_dino_main"
DINO_WEIGHTS = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
RAFT_ZIP = "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip"

# What each dimension reads from VBench's cache in local mode: (path under the cache, where it comes from).
CACHE_FILES = {
    "subject_consistency": [(DINO_REPO + "/hubconf.py", "git clone https://github.com/facebookresearch/dino"),
                            ("dino_model/dino_vitbase16_pretrain.pth", DINO_WEIGHTS)],
    "background_consistency": [CLIP_B32],
    "temporal_flickering": [],
    "motion_smoothness": [("amt_model/amt-s.pth", "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth")],
    "dynamic_degree": [("raft_model/models/raft-things.pth", RAFT_ZIP)],
    "aesthetic_quality": [CLIP_L14, ("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                                     "https://github.com/LAION-AI/aesthetic-predictor/blob/main/"
                                     "sa_0_4_vit_l_14_linear.pth?raw=true")],
    "imaging_quality": [("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                         "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/"
                         "musiq_spaq_ckpt-358bb6af.pth")],
    "object_class": [GRIT],
    "multiple_objects": [GRIT],
    "human_action": [("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
                      HF_MODELS + "l16_ptk710_ftk710_ftk400_f16_res224.pth")],
    "color": [GRIT],
    "spatial_relationship": [GRIT],
    "scene": [("caption_model/tag2text_swin_14m.pth",
               "https://huggingface.co/spaces/xinyu1205/recognize-anything/resolve/main/tag2text_swin_14m.pth")],
    "appearance_style": [CLIP_B32],
    "temporal_style": VICLIP,
    "overall_consistency": VICLIP,
}
# Dimensions whose models load bert-base-uncased from the Hugging Face hub cache (GRiT its tokenizer, Tag2Text its
# tokenizer and BertModel weights): offline, each process would spend ~90 s retrying the hub unless HF_HUB_OFFLINE=1.
HUB_DIMENSIONS = ("object_class", "multiple_objects", "color", "spatial_relationship", "scene")
# Packages a dimension imports beyond what `import vbench` needs (torch, torchvision, decord, cv2, numpy, PIL).
# lvis imports pycocotools without declaring it (detectron2 brings it; named for a Python without detectron2);
# GRiT's text decoder (grit/modeling/text/file_utils.py) imports boto3 at module level.
PACKAGES = {
    "background_consistency": ["clip"],
    "aesthetic_quality": ["clip"],
    "appearance_style": ["clip"],
    "human_action": ["clip", "timm"],
    "imaging_quality": ["pyiqa"],
    "dynamic_degree": ["easydict", "scipy"],
    "motion_smoothness": ["omegaconf"],
    "object_class": ["detectron2", "fvcore", "lvis", "pycocotools", "boto3", "transformers"],
    "multiple_objects": ["detectron2", "fvcore", "lvis", "pycocotools", "boto3", "transformers"],
    "color": ["detectron2", "fvcore", "lvis", "pycocotools", "boto3", "transformers"],
    "spatial_relationship": ["detectron2", "fvcore", "lvis", "pycocotools", "boto3", "transformers"],
    "scene": ["transformers", "timm", "fairscale"],
    "temporal_style": ["clip", "timm", "einops", "ftfy", "regex", "pkg_resources"],
    "overall_consistency": ["clip", "timm", "einops", "ftfy", "regex", "pkg_resources"],
}
# Versions a dimension's code does not run beside (seen with VBench 0.1.5): (distribution, the newest release line
# that works, why). Such a dimension needs VBench's own pins: a separate environment (eval.vbench.python).
TOO_NEW = {
    "human_action": [("numpy", (1,), "numpy 2 removed numpy.lib.function_base"),
                     ("timm", (1, 0, 12), "newer timm rejects the `cache_dir` argument")],
    "scene": [("transformers", (4,), "Tag2Text's BERT breaks under transformers 5")],
}
# Dimensions whose VBench code leaves a video out of its results by design, and why (the video is then recorded as
# such, not as an error). color.py appends a video's result only `if cur_object>0`.
LEFT_OUT = {"color": "VBench's color gives this video no value: GRiT detected the prompt's object (with a colour "
                     "word) in none of its 16 sampled frames, and color leaves such a video out of its score"}
PIP_NAMES = {"clip": "openai-clip (needs setuptools<81)", "pkg_resources": "setuptools<81",
             "detectron2": "detectron2 (not on PyPI: pip install --no-build-isolation "
                           "'git+https://github.com/facebookresearch/detectron2.git')"}


def cache_dir() -> Path:
    # The same rule as vbench/utils.py.
    return Path(os.environ.get("VBENCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vbench"))


def torch_hub_dir() -> Path:
    # torch.hub.get_dir() without importing torch: DINO's hubconf loads its weights from <hub>/checkpoints.
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(torch_home)) / "hub"


def how_to_place(path: Path, source: str) -> str:
    if source.startswith("git clone"):
        return f"{source} {path.parent}"
    if source == RAFT_ZIP:
        folder = path.parent.parent
        return f"wget {source} -P {folder} && unzip -d {folder} {folder}/models.zip"
    return f"wget '{source}' -O {path}"


def missing_files(dimension: str) -> list:
    cache = cache_dir()
    missing = []
    for relative, source in CACHE_FILES[dimension]:
        path = cache / relative
        if not path.exists():
            missing.append({"path": str(path), "source": source, "how": how_to_place(path, source)})
    if dimension == "subject_consistency":
        # VBench checks its own copy, but DINO's hubconf then loads the weights through torch's hub cache.
        hub_copy = torch_hub_dir() / "checkpoints" / "dino_vitbase16_pretrain.pth"
        if not hub_copy.is_file():
            missing.append({"path": str(hub_copy), "source": DINO_WEIGHTS,
                            "how": f"mkdir -p {hub_copy.parent} && cp {cache}/dino_model/dino_vitbase16_pretrain.pth "
                                   f"{hub_copy} (or wget '{DINO_WEIGHTS}' -O {hub_copy})"})
    return missing


def probe(request: dict) -> dict:
    answer = {"python": sys.executable, "cache_dir": str(cache_dir()), "dimensions": {}}
    spec = importlib.util.find_spec("vbench")
    if spec is None:
        answer["error"] = (f"vbench is not installed in {sys.executable}: pip install --no-deps vbench==0.1.5 "
                           "decord opencv-python-headless easydict (or point eval.vbench.python at a Python that "
                           "has it)")
        return answer
    package_dir = Path(spec.submodule_search_locations[0])
    answer["full_info"] = str(package_dir / "VBench_full_info.json")
    for dimension in request["dimensions"]:
        packages = [name for name in PACKAGES.get(dimension, []) if importlib.util.find_spec(name) is None]
        answer["dimensions"][dimension] = {
            "missing_files": missing_files(dimension),
            "missing_packages": [PIP_NAMES.get(name, name) for name in packages],
            "incompatible": too_new(dimension),
        }
    return answer


def too_new(dimension: str) -> list:
    """The installed packages a dimension's VBench code does not run beside (TOO_NEW), each with why."""
    import re
    from importlib import metadata

    problems = []
    for distribution, newest, why in TOO_NEW.get(dimension, []):
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
        if tuple(int(n) for n in re.findall(r"\d+", version)[:len(newest)]) > newest:
            problems.append(f"{distribution} {version} (needs {'.'.join(map(str, newest))}.x or older: {why})")
    return problems


def vbench_downloads(dimension: str) -> list:
    """What VBench's own download code (vbench.utils.init_submodules, local mode) fetches into its cache for a
    dimension: [{path, source}], read by running it with every file absent and its commands recorded, not run
    (nothing is downloaded or created). A folder's path ends with '/'."""
    import subprocess
    import types
    from unittest import mock
    from urllib.parse import urlparse

    import vbench.utils as utils

    commands = []

    def record(command, *args, **kwargs):
        commands.append([str(part) for part in command])
        return subprocess.CompletedProcess(command, 0)

    def absent(*args, **kwargs):
        return False

    fake_path = types.SimpleNamespace(**{**vars(os.path), "isfile": absent, "isdir": absent, "exists": absent})
    fake_os = types.SimpleNamespace(**{**vars(os), "path": fake_path, "makedirs": lambda *a, **k: None})
    with mock.patch.object(utils, "os", fake_os), mock.patch.object(utils, "subprocess",
                                                                    types.SimpleNamespace(run=record)):
        submodules = utils.init_submodules([dimension], local=True)[dimension]
    values = submodules.values() if isinstance(submodules, dict) else submodules
    read = [value for value in values if isinstance(value, str) and value.startswith(str(utils.CACHE_DIR))]
    entries = []
    for command in commands:
        if command[:2] == ["git", "clone"]:
            entries.append({"path": command[3].rstrip("/") + "/", "source": "git clone " + command[2]})
        elif command[0] == "wget":
            url = next(part for part in command if part.startswith("http"))
            folder = command[command.index("-P") + 1].rstrip("/")
            entries.append({"path": f"{folder}/{os.path.basename(urlparse(url).path)}", "source": url})
        elif command[0] == "unzip" and entries:  # RAFT: the zip is unpacked; the file VBench reads is inside
            zipped = entries.pop()
            folder = command[command.index("-d") + 1].rstrip("/")
            entries += [{"path": path, "source": zipped["source"]} for path in read if path.startswith(folder + "/")]
    return entries


def weights(request: dict) -> dict:
    """Every file each dimension needs: where VBench's own download code (init_submodules) says it comes from and
    goes, then the ones VBench fetches elsewhere (the aesthetic head, ViCLIP's BPE vocabulary) from CACHE_FILES, and
    DINO's copy in torch's hub cache; whether each is present. ViCLIP's BPE vocabulary is copied from the openai-clip
    package (it ships the same file) when it is missing and that package is installed."""
    import shutil

    cache = cache_dir()
    answer = {"python": sys.executable, "cache_dir": str(cache), "dimensions": {}}
    if importlib.util.find_spec("vbench") is None:
        answer["error"] = f"vbench is not installed in {sys.executable}: pip install --no-deps vbench==0.1.5"
        return answer
    clip = importlib.util.find_spec("clip")
    for dimension in request["dimensions"]:
        files = [{**entry, "declared_by": "vbench.utils.init_submodules"} for entry in vbench_downloads(dimension)]
        known = [Path(entry["path"]) for entry in files]
        for relative, source in CACHE_FILES[dimension]:
            path = cache / relative
            if not any(path == k or k in path.parents for k in known):
                files.append({"path": str(path), "source": source,
                              "declared_by": "stas.evaluation.vbench_worker (VBench fetches it in its own code)"})
        if dimension == "subject_consistency":
            files.append({"path": str(torch_hub_dir() / "checkpoints" / "dino_vitbase16_pretrain.pth"),
                          "source": DINO_WEIGHTS, "declared_by": "DINO's hubconf (loads it from torch's hub cache)"})
        for entry in files:
            path = Path(entry["path"])
            bpe = clip and Path(clip.origin).parent / path.name
            if path == cache / VICLIP[1][0] and not path.is_file() and bpe and bpe.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(bpe, path)
                entry["copied_from"] = str(bpe)
            entry["present"] = path.is_dir() if entry["path"].endswith("/") else path.is_file()
            entry["how"] = (f"{entry['source']} {path}" if entry["source"].startswith("git clone")
                            else how_to_place(path, entry["source"]))
        answer["dimensions"][dimension] = files
    return answer


def video_weight(dimension: str, result: dict) -> int:
    """How VBench pools this video's value into the dimension's value (see each compute_<dimension>)."""
    if dimension == "subject_consistency":
        import decord  # VBench reads the frames with decord; its sum runs over frame pairs

        return len(decord.VideoReader(result["video_path"], num_threads=1)) - 1
    for key in ("cnt_per_video", "frame_count"):
        if key in result:
            return int(result[key])
    if dimension in ("spatial_relationship", "appearance_style"):
        return len(result["frame_results"])
    return 1


def guard_no_detection(dimension: str) -> None:
    """VBench's color divides by the number of videos with the object detected (color.py: `success_frame_count_all
    / video_count`); when there is none it raises ZeroDivisionError, and its results (none: a video gets one only
    when detected) are lost. Wrap its `color` so that exactly that division gives (None, []) instead; any other
    error passes through."""
    if dimension != "color":
        return
    import vbench.color as module

    original = module.color

    def color(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except ZeroDivisionError as err:
            innermost = err.__traceback__
            while innermost.tb_next is not None:
                innermost = innermost.tb_next
            if innermost.tb_frame.f_code is not original.__code__:  # raised elsewhere (in a model): a real error
                raise
            return None, []

    module.color = color  # compute_color looks `color` up in its module when called


def evaluate(request: dict) -> dict:
    import torch
    from vbench import VBench

    dimension = request["dimension"]
    guard_no_detection(dimension)
    device = request.get("device") or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    full_info = request.get("full_info") or str(Path(importlib.util.find_spec("vbench").origin).parent
                                                / "VBench_full_info.json")
    work_dir = Path(request["work_dir"])
    bench = VBench(torch.device(device), full_info, str(work_dir))
    prompts = request.get("prompts") or {}
    # Scoring needs no gradients, and some of VBench's code runs its models without no_grad: scene's Tag2Text keeps
    # the autograd graph of its Swin-B encoder over 16 frames at 384 px (over 20 GB on CPU, killed for memory here).
    with torch.no_grad():
        bench.evaluate(videos_path=request["videos_dir"], name=dimension, dimension_list=[dimension], local=True,
                       mode=request["mode"], **({"prompt_list": prompts} if request["mode"] == "custom_input" else {}))
    value, per_video = json.loads((work_dir / f"{dimension}_eval_results.json").read_text())[dimension]
    return {
        "dimension": dimension,
        "device": device,
        "value": None if value is None else float(value),
        "left_out": LEFT_OUT.get(dimension),  # why a video without a result has none; None: it is an error
        "videos": [{"video": Path(r["video_path"]).name, "value": float(r["video_results"]),
                    "weight": video_weight(dimension, r)} for r in per_video],
    }


def main() -> int:
    request = json.loads(Path(sys.argv[1]).read_text())
    try:
        answer = {"probe": probe, "evaluate": evaluate, "weights": weights}[request["action"]](request)
        code = 0
    except Exception as err:  # any failure inside VBench is this dimension's error, reported to stas
        answer = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        code = 1
    Path(request["output"]).write_text(json.dumps(answer))
    return code


if __name__ == "__main__":
    sys.exit(main())
