"""One planned sample's tar members -> model-ready arrays at its bucket's resolution.

Frames are decoded with decord from the member bytes in memory (sorted indices, one batched
``get_batch``), cropped around the subject to the bucket's aspect ratio and resized; the same image
transform is applied to the stored annotations when the skeleton and head-sphere maps are rendered
(:mod:`models.render`), so maps and frames line up pixel for pixel. The head sphere takes the size of
the primary reference's head (paper 3.2: "scaled to match the reference head's size").

Prefix sampling crops every sample of a clip alike (around the subject over the whole clip), so a latent cache can
hold the clip's frames once: :func:`cache_inputs` is what the cache pass (``preprocess/latents.py``) encodes, and
with ``latents`` the sample takes its video and reference latents from the cache's members instead of decoding
frames (the control maps and face crops are rendered and decoded as always).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from models import render
from preprocess import schema

from .plan import PlannedSample

F = schema.field  # field lookup by name: every name below is checked against the schema at import
VIDEO, FACE, AUDIO, TIMESTAMPS = F("video"), F("face"), F("audio"), F("timestamps")
NEEDED_NPY = {
    "subject": ("subject_box", "subject_valid"),
    "body": ("camera_K", "body_joints3d", "body_conf"),
    "hands": ("hand_joints3d", "hand_conf"),
    "head": ("head_rotation", "head_center", "head_radius", "head_valid"),
    "face": ("face_valid",),
}
for _names in NEEDED_NPY.values():
    for _n in _names:
        F(_n)
REF_FIELDS = tuple(F(f"ref_{r}") for r in schema.REF_ROLES)
LATENT = schema.LATENT_FIELDS_BY_NAME
PIXEL_MEMBERS = frozenset([VIDEO.member, *(f.member for f in REF_FIELDS)])  # what a sample from latents never reads


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the skip-count key, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Sample:
    """Arrays of one sample, channel-last uint8 images (batched and transposed by the dataset). From latents,
    ``video`` is None and ``refs`` are (C, h, w) latents instead of images."""

    key: str
    video: np.ndarray | None  # (T, H, W, 3) uint8
    refs: list[np.ndarray]  # primary first, then available extras in plan order; (H, W, 3) uint8 each
    skeleton_maps: np.ndarray  # (T, H, W, 3) uint8
    head_sphere_maps: np.ndarray  # (T, H, W, 3) uint8
    face_crops: np.ndarray | None  # (T, S, S, 3) uint8
    face_valid: np.ndarray  # (T,) bool
    body_valid: np.ndarray
    head_valid: np.ndarray
    transform: np.ndarray  # (3, 3) stored-clip pixels -> bucket pixels
    video_latents: np.ndarray | None = None  # (C, t, h, w) float16, from the latent cache
    audio: np.ndarray | None = None  # (round(T * AUDIO_RATE / fps),) float32 from the first sampled frame on
    audio_samples: int = 0  # of ``audio``, the samples the clip has (0: no audio; the rest are zeros)


@dataclass
class CacheInputs:
    """The pixels a latent cache encodes for one clip, framed as prefix sampling frames every sample of it."""

    bucket: tuple[int, int]  # (H, W)
    box: tuple[int, int, int, int]  # the crop, stored-clip pixels
    frames: tuple[int, ...]  # stored-clip frames of ``video`` (Framing.cached_frames)
    video: np.ndarray  # (T, H, W, 3) uint8
    primary_frames: tuple[int, ...]  # Framing.candidates
    primaries: np.ndarray  # (K, H, W, 3) uint8
    ref_roles: tuple[str, ...]  # the stored references present, in schema.REF_ROLES order
    refs: np.ndarray  # (R, H, W, 3) uint8


def required_members(groups, latents: bool = False) -> list[schema.Field]:
    """Non-optional fields of the clip group and ``groups`` (from latents: the cache's instead of the clip's
    pixels): a sample without one is skipped."""
    fields = [f for f in schema.fields_of(["clip", *groups]) if not f.optional]
    if latents:
        fields = [f for f in fields if f.member not in PIXEL_MEMBERS] + list(schema.LATENT_FIELDS)
    return fields


class DecoderMissing(RuntimeError):
    """The configured video reader cannot be imported: an environment error that stops the loader (skipping
    every sample as undecodable would spin through the whole run)."""

    def __init__(self, decoder: str, cause: BaseException | None = None):
        other = "pyav" if decoder == "decord" else "decord"
        package = DECODER_MODULES.get(decoder, decoder)
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(
            f"the training loader decodes clips with {decoder!r} (data.workers.decoder), which cannot be imported "
            f"here{why}: install it (pip install {package}) or set data.workers.decoder={other}")
        self.decoder = decoder


DECODER_MODULES = {"decord": "decord", "pyav": "av"}


def require_decoder(decoder: str) -> None:
    """Raise :class:`DecoderMissing` (or ``ValueError`` for an unknown name) unless ``decoder`` can be imported."""
    if decoder not in DECODER_MODULES:
        raise ValueError(f"data.workers.decoder={decoder!r}: expected one of {sorted(DECODER_MODULES)}")
    import importlib

    try:
        importlib.import_module(DECODER_MODULES[decoder])
    except ImportError as e:
        raise DecoderMissing(decoder, e) from None


def decode_frames(data: bytes, indices, threads: int = 1, decoder: str = "decord") -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) of an in-memory MP4: (N, H, W, 3) uint8.

    ``decord``: one batched ``get_batch`` over the sorted indices. ``pyav``: decode from the start and keep
    the wanted frames (the stored clips are short, one GOP or a few): ~1.7x less CPU here
    (docs/performance.md, "Data loader").
    """
    idx = np.asarray(indices, dtype=np.int64)
    uniq, inverse = np.unique(idx, return_inverse=True)  # sorted: both readers only go forward
    try:
        frames = _decode_pyav(data, uniq, threads) if decoder == "pyav" else _decode_decord(data, uniq, threads)
    except SampleError:
        raise
    except ImportError as e:  # this machine lacks the reader: no clip would decode, so it is not the clip's fault
        raise DecoderMissing(decoder, e) from None
    except Exception as e:  # decord.DECORDError, av.error.*, RuntimeError on unreadable containers
        raise SampleError("video_undecodable", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if len(uniq) == len(idx) and (uniq == idx).all():
        return frames  # already in the asked order: no gathering copy
    return frames[inverse]


def _decode_decord(data: bytes, uniq: np.ndarray, threads: int) -> np.ndarray:
    import decord

    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=threads)
    n = len(vr)
    if uniq[-1] >= n:
        raise SampleError("video_short", f"frame {int(uniq[-1])} requested, the stream has {n}")
    return vr.get_batch(uniq.tolist()).asnumpy()


def _decode_pyav(data: bytes, uniq: np.ndarray, threads: int) -> np.ndarray:
    import av

    out = []
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO" if threads > 1 else "NONE"
        if threads > 1:
            s.thread_count = threads
        k = 0
        for i, frame in enumerate(c.decode(s)):  # frames come out in presentation order
            if i == uniq[k]:
                out.append(frame.to_ndarray(format="rgb24"))
                k += 1
                if k == len(uniq):
                    break
    if k < len(uniq):
        raise SampleError("video_short", f"frame {int(uniq[k])} requested, the stream has {i + 1 if out else 0}")
    return np.stack(out)


def crop_box(width: int, height: int, out_h: int, out_w: int, center) -> tuple[int, int, int, int]:
    """Largest box of aspect ``out_w / out_h`` inside the frame, centred as near ``center`` as fits (integer px)."""
    scale = max(out_h / height, out_w / width)
    bw = min(width, max(1, int(round(out_w / scale))))
    bh = min(height, max(1, int(round(out_h / scale))))
    x0 = int(round(min(max(center[0] - bw / 2, 0), width - bw)))
    y0 = int(round(min(max(center[1] - bh / 2, 0), height - bh)))
    return x0, y0, x0 + bw, y0 + bh


def resize_crop(img: np.ndarray, box, out_h: int, out_w: int, out: np.ndarray | None = None) -> np.ndarray:
    """Crop ``box`` out of ``img`` and resize to (out_h, out_w), into ``out`` when given.

    Bilinear down to half size (the 1280 px clips -> the 960x640 bucket is 0.75), area averaging below
    that (bilinear would alias); bilinear is 8x cheaper than area on this path (docs/performance.md).
    """
    import cv2

    x0, y0, x1, y1 = box
    crop = img[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if (x1 - x0) > 2 * out_w else cv2.INTER_LINEAR
    return cv2.resize(crop, (out_w, out_h), dst=out, interpolation=interp)


def shift_frames(video: np.ndarray, transform: np.ndarray, shift) -> tuple[np.ndarray, np.ndarray]:
    """(transform, video) with the frames (T, H, W, 3) translated by ``shift`` = (dx, dy) in fractions of the side
    (whole pixels, black where nothing was) and the stored-clip -> bucket ``transform`` moved alike, so that the
    control maps rendered through it and ``crop_transform`` stay on the moved person."""
    h, w = video.shape[1:3]
    dx, dy = int(round(shift[0] * w)), int(round(shift[1] * h))
    out = np.zeros_like(video)
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        video[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    moved = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]]) @ np.asarray(transform, np.float64)
    return moved.astype(np.asarray(transform).dtype), out


def letterbox(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Fit ``img`` inside (out_h, out_w) keeping its aspect ratio, centred on black."""
    import cv2

    h, w = img.shape[:2]
    s = min(out_h / h, out_w / w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    out = np.zeros((out_h, out_w, 3), np.uint8)
    y0, x0 = (out_h - nh) // 2, (out_w - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return out


def _npy(members: dict, name: str, n_frames: int) -> np.ndarray:
    f = F(name)
    try:
        value = schema.decode(f, members[f.member])
    except Exception as e:
        raise SampleError("bad_field", f"{f.member}: {type(e).__name__}: {e}") from None
    why = schema.check_value(f, value, n_frames)
    if why:
        raise SampleError("bad_field", why)
    return value


def build_sample(members: dict[str, bytes], ps: PlannedSample, height: int, width: int, groups, render_cfg, *,
                 face_crops: bool, face_size: int = schema.FACE_CROP_SIZE, decode_threads: int = 1,
                 decoder: str = "decord", prefix: bool = False, latents: bool = False,
                 compression: tuple[int, int] = (4, 8), audio: bool = False) -> Sample:
    """Decode, crop and render one planned sample; raises :class:`SampleError` with a skip reason.

    1. check the members and read the clip's size from its meta; 2. load the annotation arrays;
    3. crop box around the subject (over the sampled frames; prefix sampling: over the whole clip; from latents:
    the cache's); 4. decode the sampled frames and the primary reference (from latents: their cached latents);
    5. the other references; 6. the control maps (skeleton, head sphere); 7. the face crops; 8. with ``audio``, the
    audio of the sampled frames."""
    n, clip_w, clip_h, clip_fps = _clip_meta(members, ps, groups, latents)
    arr = _annotations(members, groups, n)
    idx = np.asarray(ps.frame_index, dtype=np.int64)
    video_latents = video = None
    if latents:
        box, video_latents, refs = _cached(members, ps, (height, width), compression)
    else:
        box = _subject_box(arr, np.arange(n) if prefix else idx, clip_w, clip_h, height, width)
        video, (primary,) = _frames(members, idx, [ps.primary_frame], box, (clip_w, clip_h), (height, width),
                                    decode_threads, decoder)
        extras = reference_images(members, ps.ref_order, box, (clip_w, clip_h), (height, width))
        refs = [primary, *(img for _, img in extras)]
    transform = render.crop_resize_transform(box, (height, width))
    if any(ps.shift) and video is not None:
        transform, video = shift_frames(video, transform, ps.shift)
    ones = np.ones(len(idx), bool)
    head_valid = arr["head_valid"][idx].astype(bool) if "head_valid" in arr else ~ones
    skeleton, sphere = _control_maps(arr, idx, ps.primary_frame, head_valid, transform, (height, width), render_cfg)
    faces = _face_crops(members, idx, face_size, decode_threads, decoder) if face_crops and "face" in groups else None
    wave, n_audio = clip_audio(members, idx, ps.fps, n, clip_fps) if audio else (None, 0)
    return Sample(ps.key, video, refs, skeleton, sphere, faces,
                  arr["face_valid"][idx].astype(bool) if "face_valid" in arr else ~ones,
                  arr["subject_valid"][idx].astype(bool) if "subject_valid" in arr else ones,
                  head_valid, transform, video_latents, wave, n_audio)


def cache_inputs(members: dict[str, bytes], framing, max_frames: int, groups, decode_threads: int = 1,
                 decoder: str = "decord") -> CacheInputs:
    """What the latent cache encodes for one clip: its first frames (``framing.cached_frames``), the primary
    candidates and the stored references, cropped and resized as a prefix-sampled sample of the clip is (the same
    steps as :func:`build_sample`); raises :class:`SampleError`."""
    n, clip_w, clip_h, fps = _clip_meta(members, None, groups)
    arr = _annotations(members, groups, n)
    size = framing.buckets[framing.bucket_of(clip_w, clip_h)]
    box = _subject_box(arr, np.arange(n), clip_w, clip_h, *size)
    frames, candidates = framing.cached_frames(n, fps, max_frames), framing.candidates(n)
    video, primaries = _frames(members, np.asarray(frames), candidates, box, (clip_w, clip_h), size, decode_threads,
                               decoder)
    refs = reference_images(members, range(len(schema.REF_ROLES)), box, (clip_w, clip_h), size)
    images = np.stack([img for _, img in refs]) if refs else np.zeros((0, *size, 3), np.uint8)
    return CacheInputs(tuple(size), tuple(box), tuple(frames), video, tuple(candidates), np.stack(primaries),
                       tuple(schema.REF_ROLES[r] for r, _ in refs), images)


def _clip_meta(members: dict[str, bytes], ps: PlannedSample | None, groups,
               latents: bool = False) -> tuple[int, int, int, float]:
    """(frames, width, height, fps) of the stored clip, after checking the members the groups need and the plan."""
    missing = [f.member for f in required_members(groups, latents) if not members.get(f.member)]
    if missing:
        raise SampleError("missing_field", f"missing {missing}")
    try:
        meta = schema.decode(F("meta"), members[F("meta").member])
        n = int(meta["n_frames"])
        clip_w, clip_h, fps = int(meta["width"]), int(meta["height"]), float(meta["fps"])
    except Exception as e:
        raise SampleError("bad_field", f"meta.json: {type(e).__name__}: {e}") from None
    if ps is not None and (max(ps.frame_index) >= n or ps.primary_frame >= n):
        raise SampleError("meta_mismatch", f"meta.json says {n} frames; the plan (from the stats) needs frame "
                          f"{max(ps.frame_index)}")
    return n, clip_w, clip_h, fps


def _cached(members: dict[str, bytes], ps: PlannedSample, size, compression: tuple[int, int]):
    """(crop box, video latents (C, t, h, w), [primary, extras in plan order] latents (C, h, w)) of a sample from
    the latent cache's members; the cache must hold the sample's frames as a prefix, its primary among the
    candidates, at the batch's bucket."""
    try:
        lm = schema.decode(LATENT["latent_meta"], members[LATENT["latent_meta"].member])
        box, cached, candidates, roles = tuple(lm["crop_box"]), lm["frames"], lm["primary_frames"], lm["ref_roles"]
        bucket = tuple(lm["bucket"])
    except Exception as e:
        raise SampleError("bad_field", f"latent_meta.json: {type(e).__name__}: {e}") from None
    if bucket != tuple(size) or list(ps.frame_index) != cached[:len(ps.frame_index)] or \
            ps.primary_frame not in candidates:
        raise SampleError("latents_mismatch", f"the cache holds frames {cached[:3]}... of bucket {bucket} with "
                          f"candidates {candidates}; the plan wants frames {list(ps.frame_index[:3])}... of {size}, "
                          f"primary {ps.primary_frame}")
    tc, sc = compression
    dims = {"t": 1 + (len(cached) - 1) // tc, "K": len(candidates), "R": len(roles), "h": size[0] // sc,
            "w": size[1] // sc}
    z = {}
    for name in ("video_latents", "primary_latents", "ref_latents"):
        f = LATENT[name]
        try:
            value = schema.decode(f, members[f.member])
        except Exception as e:
            raise SampleError("bad_field", f"{f.member}: {type(e).__name__}: {e}") from None
        why = schema.check_value(f, value, len(cached), {**dims, "C": (z.get("video_latents", value)).shape[0]})
        if why:
            raise SampleError("bad_field", why)
        z[name] = value
    refs = [z["primary_latents"][:, candidates.index(ps.primary_frame)]]
    refs += [z["ref_latents"][:, roles.index(schema.REF_ROLES[r])] for r in ps.ref_order
             if schema.REF_ROLES[r] in roles]
    return box, z["video_latents"][:, :1 + (len(ps.frame_index) - 1) // compression[0]], refs


def _annotations(members: dict[str, bytes], groups, n: int) -> dict[str, np.ndarray]:
    """The annotation arrays: of the groups the dataset declares, plus any other whose members are all there
    (shard URLs without a dataset.json: hands are drawn when the shards have them)."""
    present = [g for g, names in NEEDED_NPY.items() if g in groups or all(members.get(F(x).member) for x in names)]
    return {name: _npy(members, name, n) for g in present for name in NEEDED_NPY[g]}


def _subject_box(arr: dict, idx: np.ndarray, clip_w: int, clip_h: int, height: int, width: int):
    """The crop box, centred on the subject over the sampled frames (the frame's centre when not found)."""
    center = (clip_w / 2, clip_h / 2)
    if "subject_box" in arr:
        ok = arr["subject_valid"][idx].astype(bool)
        if ok.any():
            b = arr["subject_box"][idx][ok]
            center = ((b[:, 0].min() + b[:, 2].max()) / 2, (b[:, 1].min() + b[:, 3].max()) / 2)
    return crop_box(clip_w, clip_h, height, width, center)


def _frames(members, idx: np.ndarray, extra, box, clip_size, size, decode_threads: int, decoder: str):
    """(the frames ``idx`` (T, H, W, 3), [each frame of ``extra`` (H, W, 3)]), cropped and resized."""
    (clip_w, clip_h), (height, width) = clip_size, size
    wanted = np.unique(np.concatenate([idx, np.asarray(extra, np.int64)]))  # sorted, so decord only seeks forward
    frames = decode_frames(members[VIDEO.member], wanted, decode_threads, decoder)
    if frames.shape[1:3] != (clip_h, clip_w):
        raise SampleError("meta_mismatch",
                          f"video is {frames.shape[2]}x{frames.shape[1]}, meta.json says {clip_w}x{clip_h}")
    at = {int(f): i for i, f in enumerate(wanted)}
    video = np.empty((len(idx), height, width, 3), np.uint8)
    for i, f in enumerate(idx):
        resize_crop(frames[at[int(f)]], box, height, width, out=video[i])
    return video, [resize_crop(frames[at[int(f)]], box, height, width) for f in extra]


def reference_images(members, ref_order, box, clip_size, size) -> list[tuple[int, np.ndarray]]:
    """(role index, image) of the stored reference images in ``ref_order`` (absent ones skipped): a full frame of
    the clip's size keeps the clip's framing; other crops (half body) are fitted whole."""
    import cv2

    (clip_w, clip_h), (height, width) = clip_size, size
    refs = []
    for r in ref_order:
        f = REF_FIELDS[r]
        data = members.get(f.member)
        if not data:
            continue
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise SampleError("image_undecodable", f"{f.member} is not a decodable image")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        refs.append((int(r), resize_crop(img, box, height, width) if img.shape[:2] == (clip_h, clip_w)
                     else letterbox(img, height, width)))
    return refs


def _control_maps(arr: dict, idx: np.ndarray, primary_frame: int, head_valid: np.ndarray, transform, size,
                  render_cfg) -> tuple[np.ndarray, np.ndarray]:
    """(skeleton, head sphere) maps (T, H, W, 3) uint8, blank where the groups are absent. The two stay apart
    (concatenated on the device by DreamActorBatch.conditions): interleaving them here would copy every pixel
    once more."""
    blank = np.zeros((len(idx), *size, 3), np.uint8)
    skeleton = sphere = blank
    if "body_joints3d" in arr:
        hands = {}
        if "hand_joints3d" in arr:
            hands = dict(hands3d=arr["hand_joints3d"][idx], hand_conf=arr["hand_conf"][idx])
        skeleton = render.render_skeleton_map(
            arr["body_joints3d"][idx], arr["body_conf"][idx], arr["camera_K"][idx], size, render_cfg,
            joint_names=schema.BODY_JOINT_NAMES, transform=transform, **hands)
    if "head_center" in arr:
        radius_all, valid_all = arr["head_radius"], arr["head_valid"].astype(bool)
        ok_ref = valid_all & np.isfinite(radius_all) & (radius_all > 0)
        ref_radius = radius_all[primary_frame] if ok_ref[primary_frame] else \
            (float(np.median(radius_all[ok_ref])) if ok_ref.any() else 0.0)
        radius = render.retarget_head_radius(radius_all[idx], ref_radius, valid_all[idx])
        sphere = render.render_head_sphere_map(arr["head_center"][idx], arr["head_rotation"][idx], radius,
                                               size, valid=head_valid, transform=transform)
    return skeleton, sphere


def _face_crops(members, idx: np.ndarray, face_size: int, decode_threads: int, decoder: str) -> np.ndarray:
    """The face crops of the sampled frames (T, S, S, 3), resized when the model's crop size differs."""
    import cv2

    try:
        faces = decode_frames(members[FACE.member], idx, decode_threads, decoder)
    except SampleError as e:
        raise SampleError("face_" + e.reason.split("_", 1)[1], f"{FACE.member}: {e}") from None
    if faces.shape[1:3] != (face_size, face_size):
        interp = cv2.INTER_AREA if faces.shape[1] > face_size else cv2.INTER_LINEAR
        faces = np.stack([cv2.resize(f, (face_size, face_size), interpolation=interp) for f in faces])
    return faces


def audio_window(wave: np.ndarray, rate: int, start_s: float, n_frames: int, fps: float) -> np.ndarray:
    """The audio of ``n_frames`` frames at ``fps`` whose first frame starts ``start_s`` seconds into ``wave``, laid out
    as a row of a batch's ``audio``: float32 in [-1, 1] at ``schema.AUDIO_RATE`` mono, ``round(n_frames * AUDIO_RATE
    / fps)`` samples, sample 0 at the start of the first frame; zeros where ``wave`` has none.

    ``wave``: samples at ``rate`` (int16 PCM, scaled by 1/32768, or float in [-1, 1]); several channels, as (C, N)
    or (N, C) with C < N, are averaged; another rate than AUDIO_RATE is resampled as preprocessing resamples.
    The loader cuts the stored clips' audio with it; inference cuts a driving waveform (e.g.
    ``preprocess.audio.read_audio(path)``: its ``samples`` from its ``start_s``) for each segment."""
    from preprocess.audio import resample

    x = np.asarray(wave)
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=int(np.argmin(x.shape)))
    n = int(round(n_frames * schema.AUDIO_RATE / fps))
    if int(rate) != schema.AUDIO_RATE:  # resample only the window (and a margin for the filter), not the whole wave
        margin = int(0.05 * rate)
        a = max(0, int(np.floor(start_s * rate)) - margin)
        b = max(a, int(np.ceil((start_s + n_frames / fps) * rate)) + margin)
        x, start_s = resample(x[a:b], rate), start_s - a / rate
    out = np.zeros(n, np.float32)
    i0 = int(round(start_s * schema.AUDIO_RATE))
    lo, hi = max(i0, 0), min(i0 + n, len(x))
    if hi > lo:
        out[lo - i0:hi - i0] = x[lo:hi]
    return out


def clip_audio(members: dict[str, bytes], idx: np.ndarray, fps: float, n_frames: int, clip_fps: float
               ) -> tuple[np.ndarray, int]:
    """(the audio of the sampled frames ``idx`` at ``fps``: :func:`audio_window` of the clip's stored audio from frame
    ``idx[0]`` on, samples of it the clip has); zeros and 0 when the clip has no audio (meta ``audio_status``)."""
    ts = _npy(members, TIMESTAMPS.name, n_frames)
    start_s = float(ts[idx[0]] - ts[0])
    if not members.get(AUDIO.member):
        return audio_window(np.zeros(0, np.float32), schema.AUDIO_RATE, start_s, len(idx), fps), 0
    from preprocess.audio import decode_flac

    data = members[AUDIO.member]
    why = schema.check_value(AUDIO, data, n_frames, {"S": schema.audio_length(ts, clip_fps)})
    if why:
        raise SampleError("bad_field", why)
    try:
        stored = decode_flac(data)
    except Exception as e:
        raise SampleError("bad_field", f"{AUDIO.member}: {type(e).__name__}: {e}") from None
    if len(stored) != schema.audio_length(ts, clip_fps):
        raise SampleError("bad_field", f"{AUDIO.member}: {len(stored)} samples decoded, its header says "
                          f"{schema.audio_length(ts, clip_fps)}")
    row = audio_window(stored, schema.AUDIO_RATE, start_s, len(idx), fps)
    return row, max(0, min(len(row), len(stored) - int(round(start_s * schema.AUDIO_RATE))))
