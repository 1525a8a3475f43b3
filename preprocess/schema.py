"""The shard format: one definition of every field, imported by the writer, the validator and the
training reader. No field name is spelled anywhere else.

A sample is one clip. Its tar members are ``{key}.{field.member}``; ``key`` is
``{video_key}_{clip:04d}`` (hex + underscore, no dots, so WebDataset splits the member name at the
first dot into key and field). Fields are grouped: ``clip`` is written by the engine for every
sample; every other group is written by one annotator stage and is required exactly when the
dataset's ``dataset.json`` lists that group (see docs/data-format.md).
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 3
# Versions this code reads. 2 added, next to optional fields only (a version-1 dataset reads as a version-2 one
# without them: the SMPL-X fit in the body group, ``head_fit_px``), one size a dataset now fixes: the ``identity``
# embedding's length is a property of the identity backend, recorded in dataset.json ``dims`` (``identity_dim``); a
# version-1 dataset has none and means 128 (dlib). 3 added each clip's audio (the optional ``audio`` field and the
# meta key ``audio_status``); a version-1 or 2 dataset reads as one whose clips have no audio. A rerun still refuses
# to add to an output of another version.
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
# Named sizes a dataset fixes once (dataset.json ``dims``), with what a dataset that records none means.
DEFAULT_DIMS = {"identity_dim": 128}

KEY_RE = re.compile(r"^[0-9a-f]{16}_[0-9]{4}$")


def check_key(key) -> str:
    """``key`` when it is a clip key (:data:`KEY_RE`), else a ValueError. A key read from a dataset becomes a
    file name (``previews/{key}.mp4``): a crafted one (``../../x``) must never reach a path."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ValueError(f"{key!r} is not a clip key (16 hex digits, '_', 4 digits: {KEY_RE.pattern})")
    return key


def clip_key(video_key: str, clip_index: int) -> str:
    """The stable, dot-free key of clip ``clip_index`` of a video."""
    return f"{video_key}_{clip_index:04d}"


# SMPL-X joints (smplx.joint_names.JOINT_NAMES order) that the body fields carry: the 25 joints
# of the kinematic body tree and the 11 face/foot keypoints. Hands have their own fields.
SMPLX_BODY_JOINTS: tuple[tuple[int, str], ...] = (
    (0, "pelvis"), (1, "left_hip"), (2, "right_hip"), (3, "spine1"), (4, "left_knee"),
    (5, "right_knee"), (6, "spine2"), (7, "left_ankle"), (8, "right_ankle"), (9, "spine3"),
    (10, "left_foot"), (11, "right_foot"), (12, "neck"), (13, "left_collar"), (14, "right_collar"),
    (15, "head"), (16, "left_shoulder"), (17, "right_shoulder"), (18, "left_elbow"),
    (19, "right_elbow"), (20, "left_wrist"), (21, "right_wrist"), (22, "jaw"),
    (23, "left_eye_smplhf"), (24, "right_eye_smplhf"), (55, "nose"), (56, "right_eye"),
    (57, "left_eye"), (58, "right_ear"), (59, "left_ear"), (60, "left_big_toe"),
    (61, "left_small_toe"), (62, "left_heel"), (63, "right_big_toe"), (64, "right_small_toe"),
    (65, "right_heel"),
)
BODY_JOINT_NAMES = tuple(n for _, n in SMPLX_BODY_JOINTS)
BODY_SMPLX_INDEX = np.array([i for i, _ in SMPLX_BODY_JOINTS], dtype=np.int16)
N_BODY = len(SMPLX_BODY_JOINTS)

# 21 joints per hand in the MediaPipe/OpenPose order; index 0 is the subject's left hand.
HAND_JOINT_NAMES = (
    "wrist", "thumb1", "thumb2", "thumb3", "thumb_tip", "index1", "index2", "index3", "index_tip",
    "middle1", "middle2", "middle3", "middle_tip", "ring1", "ring2", "ring3", "ring_tip",
    "pinky1", "pinky2", "pinky3", "pinky_tip",
)
N_HAND = len(HAND_JOINT_NAMES)

# SMPL-X fit (annotators=full, body stage): the 127 joints smplx.SMPLX(use_face_contour=False) returns
# (smplx.joint_names.JOINT_NAMES[:127]: 55 kinematic joints, 21 vertex keypoints, 51 face landmarks), its
# parameters, and the per-frame 2D reprojection error of each joint group.
N_SMPLX_JOINTS = 127
N_SMPLX_BETAS = 10
SMPLX_FIT_GROUPS = ("body", "feet", "left_hand", "right_hand", "face")

FACE_CROP_SIZE = 224

# Audio (schema 3): a clip's audio is the source's first audio stream over the clip's time span, resampled to this
# rate, mono, int16 PCM. The one place the rate is set: preprocessing, the loader and inference import it.
AUDIO_RATE = 16000
# meta.json ``audio_status``: "ok" (the clip has its ``audio`` member) or why it has none (preprocess/audio.py)
AUDIO_OK = "ok"
AUDIO_STATES = {
    AUDIO_OK: "the clip's audio is stored",
    "no_audio_stream": "the source has no audio stream",
    "undecodable": "the source's audio stream does not decode (no decoder, or no packet decoded)",
    "damaged": "the clip overlaps a stretch of the audio longer than preprocess.audio.MAX_FILL_S that did not decode "
               "(or a timestamp jump)",
    "not_covered": "the audio track starts after the clip or ends before it, by more than preprocess.audio.MAX_FILL_S",
}


def audio_length(timestamps: np.ndarray, fps: float) -> int:
    """Samples of a clip's ``audio``: its time span, from its first frame's time to its last frame's end
    (``timestamps[-1] + 1 / fps``), at :data:`AUDIO_RATE`; ``round(T * AUDIO_RATE / fps)`` for evenly spaced frames.
    Sample k stands for source time ``timestamps[0] + k / AUDIO_RATE``."""
    ts = np.asarray(timestamps, dtype=np.float64)
    if not len(ts):
        return 0
    return int(round((float(ts[-1] - ts[0]) + 1.0 / float(fps)) * AUDIO_RATE))

REF_ROLES = ("yaw_max", "yaw_min", "yaw_median", "half_body")
SHOT_SCALES = ("portrait", "upper_body", "full_body")


@dataclass(frozen=True)
class Field:
    """One tar member of a sample."""

    name: str  # member suffix after the key, without the file extension
    ext: str  # npy | json | mp4 | jpg | flac
    group: str  # which stage writes it
    dtype: str | None = None  # npy; flac: of its samples
    shape: tuple[int | str, ...] = ()  # npy; flac: (samples,); "T" = frames of the clip
    optional: bool = False  # may be absent even when its group is present
    doc: str = ""

    @property
    def member(self) -> str:
        """Member name after ``{key}.``"""
        return f"{self.name}.{self.ext}"


FIELDS: tuple[Field, ...] = (
    # --- engine ---
    Field("meta", "json", "clip", doc="clip metadata, see META_KEYS"),
    Field("video", "mp4", "clip", doc="the clip, H.264 yuv420p, n_frames frames at meta.fps"),
    Field("frame_index", "npy", "clip", "int32", ("T",), doc="source-video frame index of each frame"),
    Field("timestamps", "npy", "clip", "float64", ("T",),
          doc="source-video time each frame stands for, s (evenly spaced at the clip's fps)"),
    Field("audio", "flac", "clip", "int16", ("S",), optional=True,
          doc="the source's audio over the clip's span: FLAC of S int16 samples, mono, AUDIO_RATE (16 kHz); sample k "
              "= source time timestamps[0] + k / 16000, S = audio_length(timestamps, fps); absent when meta "
              "audio_status is not ok (schema 3)"),
    # --- subject tracking ---
    Field("subject_box", "npy", "subject", "float32", ("T", 4), doc="main subject box x0,y0,x1,y1 px"),
    Field("subject_valid", "npy", "subject", "uint8", ("T",), doc="1 where the main subject was found"),
    Field("person_count", "npy", "subject", "uint8", ("T",), doc="people detected in the frame"),
    # --- body (SMPL-X ordered, camera frame) ---
    Field("camera_K", "npy", "body", "float32", ("T", 3, 3), doc="intrinsics, pixels of the stored clip"),
    Field("body_joints3d", "npy", "body", "float32", ("T", N_BODY, 3), doc="camera frame, metres"),
    Field("body_joints2d", "npy", "body", "float32", ("T", N_BODY, 2), doc="pixels of the stored clip"),
    Field("body_conf", "npy", "body", "float32", ("T", N_BODY), doc="0 = joint not filled"),
    Field("body_filled", "npy", "body", "uint8", (N_BODY,), optional=True,
          doc="1 for the SMPL-X joints the body backend fills at all"),
    Field("body_fit_px", "npy", "body", "float32", ("T",), optional=True,
          doc="mean px error of the rigid 3D->2D placement before joints are put on their rays"),
    # --- body: SMPL-X fit (schema 2; absent when the body backend does not fit, e.g. annotators=embedded) ---
    Field("smplx_valid", "npy", "body", "uint8", ("T",), optional=True,
          doc="1 where the SMPL-X fit is used (then body_* are its joints); 0: no subject, or the fit failed there"),
    Field("smplx_betas", "npy", "body", "float32", (N_SMPLX_BETAS,), optional=True,
          doc="shape, one per clip (smplx.SMPLX num_betas=10)"),
    Field("smplx_global_orient", "npy", "body", "float32", ("T", 3), optional=True,
          doc="axis-angle, SMPL-X body frame -> camera frame (smplx's global_orient)"),
    Field("smplx_body_pose", "npy", "body", "float32", ("T", 21, 3), optional=True, doc="axis-angle, joints 1-21"),
    Field("smplx_hand_pose", "npy", "body", "float32", ("T", 2, 15, 3), optional=True,
          doc="axis-angle of the 15 finger joints, left then right, hand mean included (use_pca=False, "
              "flat_hand_mean=True)"),
    Field("smplx_jaw_pose", "npy", "body", "float32", ("T", 3), optional=True, doc="axis-angle"),
    Field("smplx_transl", "npy", "body", "float32", ("T", 3), optional=True,
          doc="smplx's transl, camera frame, metres (expression 0, eye poses 0)"),
    Field("smplx_joints3d", "npy", "body", "float32", ("T", N_SMPLX_JOINTS, 3), optional=True,
          doc="the fitted body's 127 smplx joints (JOINT_NAMES[:127]), camera frame, metres"),
    Field("smplx_fit_px", "npy", "body", "float32", ("T", len(SMPLX_FIT_GROUPS)), optional=True,
          doc="mean 2D reprojection error per joint group (SMPLX_FIT_GROUPS), px; NaN: no keypoint or not fitted"),
    # --- hands ---
    Field("hand_joints3d", "npy", "hands", "float32", ("T", 2, N_HAND, 3), doc="camera frame, metres"),
    Field("hand_joints2d", "npy", "hands", "float32", ("T", 2, N_HAND, 2), doc="pixels"),
    Field("hand_conf", "npy", "hands", "float32", ("T", 2, N_HAND), doc="0 = joint not filled"),
    # --- head (FaceVerse-style parameters for the 3D head sphere) ---
    # conventions: preprocess/annotators/geometry.py (yaw > 0: face towards image right; pitch > 0: chin up;
    # roll > 0: head tilted counter-clockwise in the image)
    Field("head_rotation", "npy", "head", "float32", ("T", 3, 3),
          doc="head frame -> camera frame of the view looking at the head; identity = facing the camera"),
    Field("head_ypr", "npy", "head", "float32", ("T", 3), doc="yaw, pitch, roll in degrees"),
    Field("head_center", "npy", "head", "float32", ("T", 2), doc="head centre, pixels"),
    Field("head_radius", "npy", "head", "float32", ("T",), doc="head sphere radius, pixels"),
    Field("head_translation", "npy", "head", "float32", ("T", 3), doc="head centre, camera frame, metres"),
    Field("head_scale", "npy", "head", "float32", ("T",),
          doc="weak-perspective scale at the head: pixels per metre (head_radius = scale * radius_m)"),
    Field("head_valid", "npy", "head", "uint8", ("T",)),
    Field("head_fit_px", "npy", "head", "float32", ("T",), optional=True,
          doc="mean px error of the head model fit to the face landmarks (3DMM backends; 0 where no head)"),
    # --- face crops (input of the face motion encoder) ---
    Field("face", "mp4", "face", doc=f"{FACE_CROP_SIZE}x{FACE_CROP_SIZE} face crops, one per frame"),
    Field("face_box", "npy", "face", "float32", ("T", 4),
          doc="crop box x0,y0,x1,y1 px (before resize): the face box grown by meta face_margin per side"),
    Field("face_valid", "npy", "face", "uint8", ("T",)),
    Field("face_landmarks", "npy", "face", "float16", ("T", 478, 3), optional=True, doc="px, px, rel. depth"),
    Field("face_blendshapes", "npy", "face", "float16", ("T", 52), optional=True),
    # --- references and identity ---
    *(Field(f"ref_{r}", "jpg", "refs", optional=(r == "half_body"), doc=f"reference image, role {r}")
      for r in REF_ROLES),
    Field("identity", "npy", "refs", "float32", ("identity_dim",),
          doc="face-identity embedding of the clip's subject, unit norm; length: dataset.json dims.identity_dim"),
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}
GROUPS = tuple(dict.fromkeys(f.group for f in FIELDS))

# The latent cache (``preprocess/latents.py``): sidecar shards beside a dataset, one per dataset part, whose samples
# carry the dataset's keys and these members. Its own version: a dataset needs no rewrite to gain or lose a cache.
# Shapes: C latent channels, t latent frames (1 + (frames - 1) / temporal compression), h x w the latent grid of the
# clip's bucket, K primary-reference candidates, R stored references present.
LATENTS_VERSION = 1
LATENT_FIELDS: tuple[Field, ...] = (
    Field("latent_meta", "json", "latents", doc="bucket [H, W], crop_box x0,y0,x1,y1 (stored-clip px), frames (the "
          "stored-clip frames encoded, a prefix at the stride), primary_frames (the K candidates), ref_roles (R)"),
    Field("video_latents", "npy", "latents", "float16", ("C", "t", "h", "w"),
          doc="normalised VAE posterior mean of `frames`, cropped and resized to the bucket"),
    Field("primary_latents", "npy", "latents", "float16", ("C", "K", "h", "w"),
          doc="each primary-reference candidate frame encoded alone (a one-frame clip)"),
    Field("ref_latents", "npy", "latents", "float16", ("C", "R", "h", "w"),
          doc="each stored reference image of `ref_roles`, encoded alone, framed as the loader frames it"),
)
LATENT_FIELDS_BY_NAME = {f.name: f for f in LATENT_FIELDS}

# Keys every meta.json carries (the engine's own); annotators may add more (documented in docs/data-format.md).
META_KEYS = (
    "schema_version", "key", "video_key", "clip_index", "source", "shot_index",
    "start_frame", "end_frame", "n_frames", "fps", "width", "height",
    "src_fps", "src_width", "src_height", "src_codec", "src_rotation", "audio_status",
)
# Meta keys added after version 1, with the version that added them: a clip's meta.json carries them from its
# ``schema_version`` on.
META_KEYS_SINCE = {"audio_status": 3}


def meta_keys(version: int) -> tuple[str, ...]:
    """The keys a meta.json of schema ``version`` carries."""
    return tuple(k for k in META_KEYS if META_KEYS_SINCE.get(k, 1) <= version)
# An annotator's own meta key is a row column ``m_<name>``: stored as meta.json ``<name>``, and as an index column
# when it is a scalar.
ANNOTATOR_META_PREFIX = "m_"

# Row columns that are neither shard fields nor meta.json keys: what the pipeline stages hand on to each other and
# to the writer's stats rows. With FIELDS, META_KEYS and ``m_*`` these are every column a stage may write.
WORK_COLUMNS = {
    "frames": "the decoded clip, uint8 T x H x W x 3, read by every annotator; dropped before the writer",
    "source_size": "bytes of the input file (-1: not found)",
    "source_mtime": "modification time of the input file (with source and size: an earlier run finished it)",
    "source_seconds": "duration of the input video, s",
    "dropped": "shots of the video too short to make a clip, by reason; damaged_stretches: [last good, next good "
               "frame] s around what did not decode; audio: what went wrong with the audio track, in words",
    "n_clips": "clips planned for the video (the writer waits for all of them)",
    "src_start_pts": "pts of the video stream's first frame (the clip decoder seeks by it)",
    "src_pts": "stream timestamps of the clip's frames (the clip decoder finds them by these; None: none)",
    # the latent-cache pass (preprocess/latents.py): one row per dataset part, then per group of its clips
    "part_keys": "the committed clip keys of a dataset part (the latent pass encodes them)",
    "latent_group": "clips of one part at one shape (frames, bucket): pixels from the read stage, the sidecar "
                    "members from the encode stage",
}


def check_version(info: dict, where: str) -> None:
    """Raise ValueError unless a dataset.json ``info`` has a schema version this code reads."""
    if info.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(f"{where}: schema_version {info.get('schema_version')}, this code reads "
                         f"{list(READABLE_SCHEMA_VERSIONS)} (preprocess/schema.py)")


def dataset_dims(info: dict) -> dict[str, int]:
    """The named sizes of a dataset (e.g. ``identity_dim``) from its dataset.json ``info``; older datasets that record
    none get :data:`DEFAULT_DIMS`."""
    return {**DEFAULT_DIMS, **{k: int(v) for k, v in (info.get("dims") or {}).items()}}


def is_column(name: str) -> bool:
    """Whether ``name`` is a row column the schema defines: a shard field, a meta key or a work column."""
    return (name in FIELDS_BY_NAME or name in META_KEYS or name in WORK_COLUMNS
            or (name.startswith(ANNOTATOR_META_PREFIX) and len(name) > len(ANNOTATOR_META_PREFIX)))


def field(name: str) -> Field:
    """Look a field up by name, naming the known ones on a miss."""
    try:
        return FIELDS_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown shard field {name!r}; known: {sorted(FIELDS_BY_NAME)}") from None


def fields_of(groups) -> list[Field]:
    """Fields written by the given groups, in schema order."""
    groups = set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown field groups {sorted(unknown)}; known: {list(GROUPS)}")
    return [f for f in FIELDS if f.group in groups]


def resolve_shape(f: Field, n_frames: int, dims: dict[str, int] | None = None) -> tuple[int, ...]:
    """The concrete shape of an npy field for a clip of ``n_frames`` frames (``dims``: the other named sizes)."""
    dims = {"T": n_frames, **(dims or {})}
    return tuple(dims[d] if isinstance(d, str) else d for d in f.shape)


def empty(f: Field, n_frames: int = 0, dims: dict[str, int] | None = None):
    """A placeholder value of the right type (for rows that failed before this field was written)."""
    if f.ext == "npy":
        return np.zeros(resolve_shape(f, n_frames, {**DEFAULT_DIMS, **(dims or {})}), dtype=f.dtype)
    return b""


def encode(f: Field, value) -> bytes:
    """Serialise one field value to the bytes of its tar member."""
    if f.ext == "npy":
        arr = np.asarray(value)
        if arr.dtype != np.dtype(f.dtype):
            arr = arr.astype(f.dtype)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return buf.getvalue()
    if f.ext == "json":
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    if isinstance(value, np.ndarray):
        value = value.tobytes()
    return bytes(value)


def decode(f: Field, data: bytes):
    """Inverse of :func:`encode` (video and image members stay bytes)."""
    if f.ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if f.ext == "json":
        return json.loads(data)
    return data


def check_value(f: Field, value, n_frames: int, dims: dict[str, int] | None = None) -> str | None:
    """Why a decoded value does not match the schema, or None when it does."""
    if f.ext == "npy":
        if value.dtype != np.dtype(f.dtype):
            return f"{f.member}: dtype {value.dtype}, expected {f.dtype}"
        want = resolve_shape(f, n_frames, dims)
        if tuple(value.shape) != want:
            return f"{f.member}: shape {tuple(value.shape)}, expected {want}"
        return None
    if f.ext == "flac":
        try:
            info = flac_info(value)
        except ValueError as e:
            return f"{f.member}: {e}"
        want = (AUDIO_RATE, 1, np.dtype(f.dtype).itemsize * 8, *resolve_shape(f, n_frames, dims))
        have = (info["rate"], info["channels"], info["bits"], info["samples"])
        if have != want:
            return f"{f.member}: rate, channels, bits, samples {have}, expected {want}"
        return None
    if f.ext == "json":
        if f.name == "meta":
            version = value.get("schema_version", 1) if isinstance(value, dict) else 1
            missing = [k for k in meta_keys(version if isinstance(version, int) else 1) if k not in value]
            if missing:
                return f"{f.member}: missing keys {missing}"
            if "audio_status" in value and value["audio_status"] not in AUDIO_STATES:
                return f"{f.member}: audio_status {value['audio_status']!r}, expected one of {list(AUDIO_STATES)}"
        return None
    if len(value) == 0:
        return f"{f.member}: empty"
    return None


def flac_info(data: bytes) -> dict[str, int]:
    """rate, channels, bits (per sample) and samples of a FLAC stream, from its STREAMINFO header (nothing decoded);
    ValueError when ``data`` does not start like a FLAC stream."""
    data = bytes(data[:42])
    if len(data) < 42 or data[:4] != b"fLaC" or data[4] & 0x7F != 0:
        raise ValueError("not a FLAC stream (no fLaC marker and STREAMINFO block)")
    v = int.from_bytes(data[18:26], "big")  # rate (20 bits), channels - 1 (3), bits - 1 (5), samples (36)
    return {"rate": v >> 44, "channels": ((v >> 41) & 7) + 1, "bits": ((v >> 36) & 31) + 1,
            "samples": v & ((1 << 36) - 1)}


def markdown_table(fields: tuple[Field, ...] = FIELDS) -> str:
    """The field table of docs/data-format.md (``python -m preprocess.schema`` prints it)."""
    lines = ["| member | group | dtype | shape | required | meaning |", "|---|---|---|---|---|---|"]
    for f in fields:
        shape = "(" + ", ".join(str(d) for d in f.shape) + ("," if len(f.shape) == 1 else "") + ")" if f.shape else ""
        dtype = f.ext if f.ext != "npy" else f.dtype
        lines.append(f"| `{{key}}.{f.member}` | {f.group} | {dtype} | {shape} | "
                     f"{'optional' if f.optional else 'yes'} | {f.doc} |")
    return "\n".join(lines)


def update_docs(path) -> None:
    """Rewrite the field tables (shards, latent cache) between the markers of docs/data-format.md."""
    import re
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    for marker, fields in (("fields", FIELDS), ("latent-fields", LATENT_FIELDS)):
        text = re.sub(rf"(<!-- {marker}:begin[^>]*-->\n).*?(\n<!-- {marker}:end -->)",
                      lambda m, fields=fields: m.group(1) + markdown_table(fields) + m.group(2), text, flags=re.S)
    p.write_text(text)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if "--update-docs" in sys.argv:
        update_docs(Path(__file__).resolve().parents[1] / "docs" / "data-format.md")
    else:
        print(markdown_table())
