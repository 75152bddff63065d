"""mp4 writing (atomic) and reading; side-by-side comparison frames (pure functions on arrays)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stas.core.layout import chunk_of
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


# Side-by-side comparison frames: a label bar over each panel, the panels, then a row with the pixel frame index and,
# under each panel, its latent frame (amber where this pixel frame starts a new latent frame of that run's backbone).
LABEL_BAR, INFO_BAR = 16, 14
LATENT_START, LATENT_INSIDE, INFO_BACKGROUND = (255, 176, 0), (48, 48, 48), (0, 0, 0)


@dataclass(frozen=True)
class Panel:
    """One column of a comparison: (T, H, W, 3) uint8 frames, the label over them, and the temporal compression of
    the backbone that made them (for the latent-frame row)."""

    frames: np.ndarray
    label: str
    temporal_compression: int


def latent_starts(num_frames: int, temporal_compression: int) -> list[bool]:
    """For each pixel frame: whether it starts a new latent frame (frame 0, then every frame after a chunk)."""
    return [t == 0 or chunk_of(t, temporal_compression) != chunk_of(t - 1, temporal_compression)
            for t in range(num_frames)]


def scale_to_height(clip: np.ndarray, height: int) -> np.ndarray:
    """(T, H, W, 3) uint8 resized (bilinear) to `height` rows, the width by the same factor: the aspect is kept.
    A clip of that height already is returned as it is (no resampling)."""
    from PIL import Image

    frames, rows, cols, _ = clip.shape
    if rows == height:
        return clip
    width = max(1, round(cols * height / rows))
    return np.stack([np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR)) for frame in clip])


def difference(a: np.ndarray, b: np.ndarray, gain: float) -> np.ndarray:
    """|b - a| x gain, clipped to [0, 255], as uint8: black where the clips agree."""
    if a.shape != b.shape:
        raise UserError(f"a difference panel needs videos of one aspect ratio: scaled to one height they are "
                        f"{a.shape[2]}x{a.shape[1]} and {b.shape[2]}x{b.shape[1]} pixels (width x height); compare "
                        "them without difference panels")
    delta = np.abs(b.astype(np.float32) - a.astype(np.float32)) * np.float32(gain)
    return np.clip(delta, 0, 255).round().astype(np.uint8)


def fit_text(text: str, width: int, font) -> str:
    """`text`, cut to end in '...' where it is wider than `width` pixels in `font` ('' where not even '...' fits)."""
    if font.getlength(text) <= width:
        return text
    for end in range(len(text) - 1, -1, -1):
        cut = text[:end].rstrip() + "..."
        if font.getlength(cut) <= width:
            return cut
    return ""


def difference_label(label: str, first: str, gain: float) -> str:
    """'x4 |+STAS - Vanilla|' for 'tiny_wan21 +STAS' minus 'tiny_wan21 Vanilla': the words both labels start with
    (the model) left out, at least one word of each kept."""
    words, first_words = label.split(" "), first.split(" ")
    shared = min(len(os.path.commonprefix([words, first_words])), len(words) - 1, len(first_words) - 1)
    return f"x{gain:g} |{' '.join(words[shared:])} - {' '.join(first_words[shared:])}|"


def comparison_panels(clips: list[np.ndarray], labels: list[str], temporal_compression: list[int],
                      height: int | None = None, diff_gain: float | None = None) -> list[Panel]:
    """The clips as panels of one height (the tallest clip's unless given), cut to the shortest clip's frames; with
    `diff_gain`, one more panel per clip after the first: |clip - first clip| x diff_gain."""
    height = height or max(clip.shape[1] for clip in clips)
    frames = min(len(clip) for clip in clips)
    scaled = [scale_to_height(clip[:frames], height) for clip in clips]
    panels = [Panel(clip, label, c) for clip, label, c in zip(scaled, labels, temporal_compression)]
    if diff_gain is not None:
        panels += [Panel(difference(scaled[0], clip, diff_gain), difference_label(label, labels[0], diff_gain), c)
                   for clip, label, c in zip(scaled[1:], labels[1:], temporal_compression[1:])]
    return panels


def side_by_side(panels: list[Panel], gap: int = 4) -> np.ndarray:
    """Panels of one height and frame count next to each other, `gap` pixels apart, as (T, H, W, 3) uint8 frames:
    each panel's label (cut to its width) above it; below, the pixel frame index and, per panel, its latent frame,
    marked where the frame starts a new latent frame (a latent-chunk boundary of that panel's backbone)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    frames, rows = len(panels[0].frames), panels[0].frames.shape[1]
    width = sum(panel.frames.shape[2] for panel in panels) + gap * (len(panels) - 1)
    width, height = width + width % 2, LABEL_BAR + rows + 2 * INFO_BAR  # H.264 with yuv420p needs even sizes
    height += height % 2
    canvas = np.zeros((frames, height, width, 3), dtype=np.uint8)
    lefts = np.cumsum([0] + [panel.frames.shape[2] + gap for panel in panels[:-1]])
    header = Image.new("RGB", (width, LABEL_BAR))
    for left, panel in zip(lefts, panels):
        canvas[:, LABEL_BAR : LABEL_BAR + rows, left : left + panel.frames.shape[2]] = panel.frames
        ImageDraw.Draw(header).text((left + 2, 2), fit_text(panel.label, panel.frames.shape[2] - 4, font),
                                    fill=(255, 255, 255), font=font)
    canvas[:, :LABEL_BAR] = np.asarray(header)
    starts = [latent_starts(frames, panel.temporal_compression) for panel in panels]
    for t in range(frames):
        info = Image.new("RGB", (width, 2 * INFO_BAR), INFO_BACKGROUND)
        draw = ImageDraw.Draw(info)
        draw.text((2, 1), fit_text(f"frame {t}/{frames - 1}", width - 4, font), fill=(255, 255, 255), font=font)
        for left, panel, start in zip(lefts, panels, starts):
            right = left + panel.frames.shape[2] - 1
            draw.rectangle((left, INFO_BAR, right, 2 * INFO_BAR - 1), fill=LATENT_START if start[t] else LATENT_INSIDE)
            text = f"latent {chunk_of(t, panel.temporal_compression)}" + (" starts" if start[t] else "")
            draw.text((left + 2, INFO_BAR + 1), fit_text(text, right - left - 3, font),
                      fill=(0, 0, 0) if start[t] else (255, 255, 255), font=font)
        canvas[t, LABEL_BAR + rows : LABEL_BAR + rows + 2 * INFO_BAR] = np.asarray(info)
    return canvas
