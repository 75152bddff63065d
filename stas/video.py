"""mp4 writing (atomic) and reading."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import numpy as np

from stas.errors import UserError
from stas.rundir import file_lock, writing

# imageio's H.264 settings at quality 8 (what this project always wrote), with ffmpeg's exit status checked.
_ENCODE = ["-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "10", "-f", "mp4"]


def to_uint8(frames) -> np.ndarray:
    """(T, H, W, 3) floats in [0, 1] (diffusers' output_type='np') -> uint8."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_mp4(frames: np.ndarray, path: Path, fps: int, partial_dir: Path) -> int:
    """Encode (T, H, W, 3) uint8 frames to `path` atomically: a complete file appears under its name, or nothing.
    Returns the video's size in bytes.

    The temporary file lives in `partial_dir` (same file system), never beside the videos: VBench lists the video
    folder and must see only finished mp4s. It is locked while written, so leftovers of dead processes can be told
    from files in progress (`remove_leftovers`).
    """
    with writing(partial_dir):
        partial_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(partial_dir / path.name, remove=True):
        return publish_mp4(frames, partial_dir / path.name, path, fps)


def publish_mp4(frames: np.ndarray, partial: Path, path: Path, fps: int) -> int:
    """Encode frames into `partial` (a temporary file the caller holds the lock of), check that it decodes to as
    many frames, then move it to `path`; returns its size in bytes. A failed write (a full disk) is a UserError
    naming `path` and ffmpeg's reason, and leaves nothing under `path`."""
    frames = np.ascontiguousarray(to_uint8(frames))
    count, height, width, _ = frames.shape
    command = [_ffmpeg(), "-nostdin", "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", *_ENCODE, f"file:{partial}"]
    encoded = subprocess.run(command, input=frames.tobytes(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if encoded.returncode != 0:
        raise UserError(f"cannot write video {path}: ffmpeg failed: {_last_line(encoded.stderr)}")
    try:
        decoded = count_frames(partial)
    except ValueError as err:
        raise UserError(f"cannot write video {path}: the encoded file does not decode ({err})") from None
    if decoded != count:
        raise UserError(f"cannot write video {path}: the encoded file decodes to {decoded} of {count} frames")
    with writing(path):
        size = partial.stat().st_size
        os.replace(partial, path)
    return size


def count_frames(path: Path) -> int:
    """How many frames the video `path` decodes to; ValueError when it cannot be decoded (a torn file)."""
    decoded = subprocess.run([_ffmpeg(), "-nostdin", "-v", "error", "-xerror", "-i", f"file:{path}", "-map", "0:v:0",
                              "-f", "null", "-progress", "pipe:1", "-nostats", "-"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if decoded.returncode != 0:
        raise ValueError(_last_line(decoded.stderr))
    counts = [line for line in decoded.stdout.splitlines() if line.startswith(b"frame=")]
    return int(counts[-1].split(b"=", 1)[1]) if counts else 0


def _last_line(output: bytes) -> str:
    """ffmpeg's last message, without its "[out#0/mp4 @ 0x55d0...]" prefix."""
    lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
    return re.sub(r"^\[[^]]*\]\s*", "", lines[-1]) if lines else "no message"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
