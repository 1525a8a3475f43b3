"""Built-in sample inputs, made from media that ships inside installed packages (SPEC "Sample media").

Photos become short driving videos with known motion (shift, scale, in-plane rotation, horizontal
flip); the per-frame 2×3 affine that maps photo pixels to frame pixels is returned too, so tests
know the exact expected change of every annotation. ``Megamind.avi`` from Debian's ``opencv-doc`` is
the one real moving-people clip and is added when installed. Talking videos (:func:`talking_video`): a photo saying
one of :data:`SENTENCES` (Debian's ``espeak-ng`` speaks them) with its mouth opened by the speech's loudness, for
audio-driven face motion.
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


# ---------------------------------------------------------------- talking videos (audio-driven face motion)
# Sentences for talking videos: different lengths and sounds (open vowels, closures, sibilants), so that the mouth
# motion they drive differs from clip to clip.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs, then hop on the bus.",
    "Hello! My name is Grace, and I like to talk about computers.",
    "Open your mouth wide and say ah, then close it for a moment.",
    "Seven silver swans swam silently seaward, singing softly.",
    "Bob bought a big blue balloon, but it popped by the pool.",
)
# The mouth of each photo that can talk, in photo pixels: centre x, centre y, width (the lips' corners).
MOUTHS: dict[str, tuple[float, float, float]] = {
    "grace_hopper": (265.0, 274.0, 80.0),
    "astronaut": (224.0, 145.0, 46.0),
}


class SpeechUnavailable(RuntimeError):
    """espeak-ng, which speaks the sentences, is not installed."""


def speak(text: str, *, voice: str = "en-us", words_per_minute: int = 150, pitch: int = 50) -> tuple[np.ndarray, int]:
    """``text`` spoken by espeak-ng (Debian's ``espeak-ng``; scripts/install.sh installs it): a mono waveform in
    [-1, 1] (float32) and its sample rate. The same text and settings give the same samples on one espeak-ng
    version."""
    import shutil
    import subprocess
    import tempfile
    import wave

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechUnavailable("espeak-ng is not installed: apt-get install espeak-ng (scripts/install.sh does)")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "speech.wav")
        subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "-p", str(pitch), "-w", out, text],
                       check=True, capture_output=True, timeout=60)
        with wave.open(out, "rb") as w:
            if w.getsampwidth() != 2:
                raise RuntimeError(f"espeak-ng wrote {8 * w.getsampwidth()}-bit audio; expected 16-bit")
            rate, ch = w.getframerate(), w.getnchannels()
            x = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, ch).mean(axis=1)
    return (x / 32768.0).astype(np.float32), rate


def speech_features(wave: np.ndarray, rate: int, fps: float, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per video frame of ``1 / fps`` s: the loudness (RMS, scaled so that the loudest frame is 1) and the
    brightness of the sound (spectral centroid, 0 dark (oo, mm) .. 1 bright (ee, ss)), both float32 (n_frames,)."""
    hop = rate / fps
    loud = np.zeros(n_frames, np.float32)
    bright = np.zeros(n_frames, np.float32)
    freqs = None
    for i in range(n_frames):
        seg = wave[int(round(i * hop)):int(round((i + 1) * hop))]
        if len(seg) < 8:
            continue
        loud[i] = float(np.sqrt(np.mean(seg.astype(np.float64) ** 2)))
        spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
        freqs = np.fft.rfftfreq(len(seg), 1.0 / rate)
        if spec.sum() > 0:
            bright[i] = float((spec * freqs).sum() / spec.sum())
    if loud.max() > 0:
        loud /= loud.max()
    if freqs is not None:
        bright = np.clip(bright / 3000.0, 0.0, 1.0)  # ~3 kHz and above: the brightest sounds
    return loud, bright


def talking_photo(photo: np.ndarray, mouth: tuple[float, float, float], openness: float, spread: float
                  ) -> np.ndarray:
    """``photo`` with its mouth opened by ``openness`` (0 closed .. 1 wide open: the lower face drops and a dark gap
    shows between the lips) and widened by ``spread`` (0 rounded .. 1 spread)."""
    cx, cy, mw = mouth
    out = photo.copy()
    h, w = photo.shape[:2]
    drop = openness * 0.45 * mw  # how far the lower lip and jaw move down, px
    if drop >= 0.5:
        # the jaw: rows from the mouth's centre down to about a mouth width below stretch by `drop` px, columns
        # fading out at the sides of the face
        y0, y1 = int(cy), min(h, int(cy + 1.4 * mw))
        x0, x1 = max(0, int(cx - 1.1 * mw)), min(w, int(cx + 1.1 * mw))
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        fade = np.clip(1.0 - np.abs(xs - cx) / (1.1 * mw), 0.0, 1.0) ** 0.5
        t = (ys - y0) / max(y1 - y0, 1)
        shift = drop * fade * np.clip(1.0 - t, 0.0, 1.0) ** 0.7 * np.minimum(1.0, t * (y1 - y0) / max(drop, 1.0))
        region = cv2.remap(photo, xs, ys - shift, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        out[y0:y1, x0:x1] = region
        # the open mouth: a dark ellipse between the lips, as wide as the spread says
        axes = (max(1, int(round(mw * (0.32 + 0.16 * spread)))), max(1, int(round(drop * 0.55))))
        cv2.ellipse(out, (int(round(cx)), int(round(cy + drop * 0.45))), axes, 0, 0, 360, (45, 18, 22), -1,
                    lineType=cv2.LINE_AA)
    return out


@dataclass(frozen=True)
class TalkingVideo:
    """What :func:`talking_video` wrote."""

    path: Path
    n_frames: int
    fps: float
    text: str
    openness: np.ndarray  # (n_frames,) the mouth opening of each frame, 0..1 (the speech's loudness)
    spread: np.ndarray  # (n_frames,) the mouth's spread, 0..1 (the speech's brightness)
    audio_rate: int  # of the muxed track (espeak-ng's)
    audio_samples: int


def talking_video(path: str | os.PathLike, photo: str = "grace_hopper", text: str = SENTENCES[0], *,
                  fps: float = 25.0, size: tuple[int, int] = (128, 128), voice: str = "en-us",
                  words_per_minute: int = 150, lead_s: float = 0.2, crf: int = 18) -> TalkingVideo:
    """A talking head: ``photo`` (fitted into ``size`` = (w, h)) saying ``text`` (espeak-ng), the speech muxed as an
    AAC track, the mouth of every frame opened by the speech's loudness over that frame and spread by its
    brightness, so that frames and sound go together (an audio-driven face-motion model can learn the mapping).
    ``lead_s`` of silence, mouth closed, before and after. Deterministic for one espeak-ng version.
    Raises :class:`SpeechUnavailable` without espeak-ng."""
    if photo not in MOUTHS:
        raise KeyError(f"photo {photo!r} has no known mouth; talking photos: {sorted(MOUTHS)}")
    speech, rate = speak(text, voice=voice, words_per_minute=words_per_minute)
    lead = np.zeros(int(round(lead_s * rate)), np.float32)
    wave = np.concatenate([lead, speech, lead])
    n = int(np.ceil(len(wave) / rate * fps))
    wave = np.concatenate([wave, np.zeros(int(round(n / fps * rate)) - len(wave), np.float32)])
    loud, bright = speech_features(wave, rate, fps, n)
    openness = np.clip(loud * 1.25, 0.0, 1.0).astype(np.float32)
    img = load_photo(photo)
    affine = motion_affines(img.shape[:2], size, 1, Motion())[0]
    w, h = size

    def frames():
        for o, sp in zip(openness, bright):
            face = talking_photo(img, MOUTHS[photo], float(o), float(sp))
            yield cv2.warpAffine(face, affine, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT,
                                 borderValue=(40, 40, 40))

    from .video import write_mp4

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    write_mp4(str(tmp), frames(), fps, crf=crf, preset="medium", threads=1, audio=wave, audio_rate=rate)
    os.replace(tmp, path)
    return TalkingVideo(path, n, fps, text, openness, bright.astype(np.float32), rate, len(wave))
