"""mp4 writing (atomic) and reading."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def to_uint8(frames) -> np.ndarray:
    """(T, H, W, 3) floats in [0, 1] (diffusers' output_type='np') -> uint8."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_mp4(frames: np.ndarray, path: Path, fps: int, partial_dir: Path) -> None:
    """Encode (T, H, W, 3) uint8 frames to `path` atomically: a complete file appears under its name, or nothing.

    The temporary file lives in `partial_dir` (same file system), never beside the videos: VBench lists the video
    folder and must see only finished mp4s.
    """
    import imageio.v2 as imageio

    partial_dir.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir / f"{os.getpid()}-{path.name}"
    # macro_block_size=1: keep the exact frame size (imageio would otherwise resize to multiples of 16).
    with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                            macro_block_size=1, pixelformat="yuv420p", ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)
    os.replace(tmp, path)


def read_mp4(path: Path) -> np.ndarray:
    """All frames of a video as (T, H, W, 3) uint8; raises ValueError when the file cannot be decoded."""
    import imageio.v2 as imageio

    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            frames = [frame for frame in reader]
    except Exception as err:  # a corrupt file raises OSError, RuntimeError, StopIteration, ... by decoder
        raise ValueError(f"cannot decode {path}: {type(err).__name__}: {err}") from None
    if not frames:
        raise ValueError(f"cannot decode {path}: no frames")
    return np.stack(frames)


def side_by_side(clips: list[np.ndarray], labels: list[str], gap: int = 4, bar: int = 18) -> np.ndarray:
    """Clips (T, H, W, 3) uint8 next to each other, each under a label bar; as long as the shortest clip.

    Clips of different sizes are placed top-aligned on a black canvas, so nothing is resampled.
    """
    from PIL import Image, ImageDraw

    frames = min(len(clip) for clip in clips)
    height = max(clip.shape[1] for clip in clips) + bar
    width = sum(clip.shape[2] for clip in clips) + gap * (len(clips) - 1)
    width += width % 2  # H.264 with yuv420p needs even sizes
    height += height % 2
    canvas = np.zeros((frames, height, width, 3), dtype=np.uint8)
    header = Image.new("RGB", (width, bar))
    draw = ImageDraw.Draw(header)
    x = 0
    for clip, label in zip(clips, labels):
        canvas[:, bar : bar + clip.shape[1], x : x + clip.shape[2]] = clip[:frames]
        draw.text((x + 3, 3), label, fill=(255, 255, 255))
        x += clip.shape[2] + gap
    canvas[:, :bar] = np.asarray(header)
    return canvas
