"""Built-in sample inputs, made from media that ships inside installed packages (SPEC "Sample media").

Photos become short driving videos with known motion (shift, scale, in-plane rotation, horizontal
flip); the per-frame 2×3 affine that maps photo pixels to frame pixels is returned too, so tests
know the exact expected change of every annotation. ``Megamind.avi`` from Debian's ``opencv-doc`` is
the one real moving-people clip and is added when installed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

MEGAMIND = Path("/usr/share/doc/opencv-doc/examples/data/Megamind.avi")


def load_photo(name: str) -> np.ndarray:
    """A shipped photo as uint8 RGB: astronaut (upper body, frontal), camera (near-profile),
    grace_hopper (frontal portrait)."""
    if name == "astronaut":
        from skimage import data
        return data.astronaut()
    if name == "camera":
        from skimage import data
        return np.repeat(data.camera()[..., None], 3, axis=2)
    if name == "grace_hopper":
        import matplotlib
        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"{path} (ships with matplotlib) could not be read")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    raise KeyError(f"unknown sample photo {name!r}; known: astronaut, camera, grace_hopper")


@dataclass(frozen=True)
class Motion:
    """A motion applied over a clip, interpolated linearly from the first to the last frame."""

    shift: tuple[float, float] = (0.0, 0.0)  # total (dx, dy) in output pixels
    start: tuple[float, float] = (0.0, 0.0)  # (dx, dy) of the photo centre from the frame centre at the first frame
    scale: tuple[float, float] = (1.0, 1.0)  # first, last
    rotate: tuple[float, float] = (0.0, 0.0)  # degrees, counter-clockwise in the image, first, last
    flip: bool = False  # mirror the photo horizontally first


def motion_affines(photo_hw: tuple[int, int], size: tuple[int, int], n: int, m: Motion) -> np.ndarray:
    """Per-frame 2×3 affines (photo px → frame px) for ``m``; the photo is fitted to ``size``=(w,h)."""
    ph, pw = photo_hw
    w, h = size
    fit = min(w / pw, h / ph)
    out = np.zeros((n, 2, 3), np.float64)
    for i in range(n):
        a = i / max(n - 1, 1)
        s = fit * (m.scale[0] + a * (m.scale[1] - m.scale[0]))
        deg = m.rotate[0] + a * (m.rotate[1] - m.rotate[0])
        # rotate+scale about the photo centre, which lands at the frame centre plus the shift
        R = cv2.getRotationMatrix2D((pw / 2, ph / 2), deg, s)
        R[:, 2] += np.array([w / 2 - pw / 2 + m.start[0] + a * m.shift[0],
                             h / 2 - ph / 2 + m.start[1] + a * m.shift[1]])
        if m.flip:  # x' = pw - 1 - x applied to the photo before everything else
            F = np.array([[-1, 0, pw - 1], [0, 1, 0], [0, 0, 1]], np.float64)
            R = R @ F
        out[i] = R
    return out


def render_motion(photo: np.ndarray, size: tuple[int, int], n: int, m: Motion) -> tuple[np.ndarray, np.ndarray]:
    """Frames (n×h×w×3 uint8) of ``photo`` under motion ``m`` and their photo→frame affines."""
    affines = motion_affines(photo.shape[:2], size, n, m)
    w, h = size
    frames = np.stack([cv2.warpAffine(photo, A, (w, h), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=(40, 40, 40))
                       for A in affines])
    return frames, affines


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, *, crf: int = 16) -> Path:
    """Write frames to an H.264 MP4 file (written to a temporary name, then renamed).

    One x264 thread: the sample media (and what the annotators find in it) is then the same file on
    every machine, whatever its core count (video.encode_mp4)."""
    from .video import encode_mp4

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(encode_mp4(frames, fps, crf=crf, preset="medium", threads=1))
    os.replace(tmp, path)
    return path


def write_long_video(path: str | os.PathLike, seconds: float, *, size: int = 96, fps: float = 25.0,
                     shot_s: float = 10.0, crf: int = 28) -> Path:
    """A long driving video (e.g. an hour, for memory bounds), streamed to disk one frame at a time: the shipped
    photos in turn, one shot of ``shot_s`` seconds each under a slow motion, hard cuts between shots.

    Rendered and encoded frame by frame (x264 ``veryfast``, one thread: the same file on every machine), so its
    length costs disk, not memory: an hour at 96 px is ~90,000 frames and a few minutes on one core."""
    from .video import write_mp4

    photos = {name: load_photo(name) for name in ("astronaut", "grace_hopper", "camera")}
    n_total, n_shot = int(round(seconds * fps)), max(1, int(round(shot_s * fps)))

    def frames():
        for k, start in enumerate(range(0, n_total, n_shot)):
            photo = photos[("astronaut", "grace_hopper", "camera")[k % 3]]
            m = Motion(shift=(0.1 * size * (k % 5 - 2), 0.05 * size * (k % 3 - 1)), scale=(1.0, 1.0 + 0.02 * (k % 4)))
            for A in motion_affines(photo.shape[:2], (size, size), min(n_shot, n_total - start), m):
                yield cv2.warpAffine(photo, A, (size, size), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=(40, 40, 40))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    write_mp4(str(tmp), frames(), fps, crf=crf, preset="veryfast", threads=1)
    os.replace(tmp, path)
    return path


# name → (photo, motion); sizes/frame counts come from the config.
SAMPLE_MOTIONS: dict[str, tuple[str, Motion]] = {
    "astronaut_shift": ("astronaut", Motion(shift=(60.0, 30.0))),
    "astronaut_zoom_rotate": ("astronaut", Motion(scale=(0.85, 1.1), rotate=(-12.0, 12.0))),
    "astronaut_flip": ("astronaut", Motion(flip=True, shift=(-40.0, 0.0))),
    "grace_hopper_rotate": ("grace_hopper", Motion(rotate=(0.0, 20.0))),
    "camera_profile_shift": ("camera", Motion(shift=(0.0, -40.0), scale=(1.0, 0.9))),
}


def ensure_samples(directory: str | os.PathLike | None, *, size: int, n_frames: int, fps: float,
                   megamind: bool = True) -> list[str]:
    """Generate the built-in sample videos once (cached by name and settings); return their paths."""
    root = Path(directory or Path.home() / ".cache" / "dreamactor" / "samples")
    root = root / f"s{size}_n{n_frames}_f{fps:g}"
    paths: list[str] = []
    for name, (photo_name, motion) in SAMPLE_MOTIONS.items():
        p = root / f"{name}.mp4"
        if not p.exists():
            frames, _ = render_motion(load_photo(photo_name), (size, size), n_frames, motion)
            write_video(p, frames, fps)
        paths.append(str(p))
    if megamind and MEGAMIND.exists():
        paths.append(str(MEGAMIND))
    return paths
