"""python preprocess/preview.py output=DIR [key=CLIP_KEY] [out=FILE.mp4]: look at a clip's annotations.

Renders an overlay video of one clip of a preprocessed dataset so a person can check the annotations
by eye: the body skeleton (limb colours of models/skeleton.py; dashed where a limb bridges joints the
backend does not fill) and hands, the head sphere (models/render.py, as the pose encoder sees it)
with the head's axes (x red, y green, z blue), the subject and face boxes, yaw/pitch/roll and shot
scale, the face crop in a corner, and the clip's references side by side. Without ``key`` the first
clip of the index is shown; the video goes to ``{output}/previews/{key}.mp4`` unless ``out`` is given.
"""
from __future__ import annotations

import os
import re
import sys

if __package__ in (None, ""):  # `python preprocess/preview.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np

from preprocess import schema
from preprocess.shards import INDEX_FILE, TAR_SUFFIX, iter_samples, tar_path
from preprocess.state import read_table
from preprocess.storage import Storage
from preprocess.video import decode_mp4, encode_mp4

MIN_CONF = 0.3  # joints drawn above this confidence
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")  # a shard (part) name from the index: no folder in it


def load_clip(output: str, key: str | None = None) -> dict:
    """Every member of one clip (decoded per the schema), found through the dataset's index."""
    storage = Storage(output)
    index = read_table(storage, INDEX_FILE)
    if not len(index):
        raise SystemExit(f"{storage.url(INDEX_FILE)} lists no clip")
    if key is None:
        key = str(index["key"].iloc[0])
    try:  # the key names the preview file: a dataset's crafted key must not write outside previews/
        schema.check_key(key)
    except ValueError as e:
        raise SystemExit(f"{e}; refusing it (from key= or {storage.url(INDEX_FILE)}): a clip key becomes a file "
                         "name") from None
    hit = index[index["key"] == key]
    if not len(hit):
        raise SystemExit(f"clip {key!r} is not in {storage.url(INDEX_FILE)} (e.g. {list(index['key'][:3])})")
    shard = str(hit["shard"].iloc[0])
    if not PLAIN_NAME.fullmatch(shard) or ".." in shard:
        raise SystemExit(f"{storage.url(INDEX_FILE)} names shard {shard!r} for clip {key}: not a part name; "
                         "refusing to read a path outside shards/")
    sample: dict = {"key": key}
    with storage.fs.open_input_stream(storage.path(tar_path(shard.removesuffix(TAR_SUFFIX)))) as f:
        for k, members in iter_samples(f, select=lambda k, _: k == key):
            if k != key:
                continue
            for member, data in members.items():
                name = member.rsplit(".", 1)[0]
                sample[name] = schema.decode(schema.field(name), data) if name in schema.FIELDS_BY_NAME else data
            break  # members of a clip are contiguous: nothing more to read
    if "video" not in sample:
        raise SystemExit(f"clip {key!r} not found in shard {shard}")
    return sample


def _pt(p) -> tuple[int, int]:
    return int(round(float(p[0]))), int(round(float(p[1])))


def draw_body(img: np.ndarray, j2: np.ndarray, conf: np.ndarray, width: int) -> None:
    """Limbs between confident joints; a joint whose skeleton parent is unfilled is bridged (dashed)
    to its nearest confident ancestor, so the torso shows even where the backend has no spine."""
    from models.skeleton import body_layout

    layout = body_layout(schema.BODY_JOINT_NAMES)
    ok = conf > MIN_CONF
    colour = {int(b): c for (a, b), c in zip(layout.limbs, layout.limb_colors)}
    for j in np.flatnonzero(ok):
        p, bridged = int(layout.parents[j]), False
        while p >= 0 and not ok[p]:
            p, bridged = int(layout.parents[p]), True
        if p < 0 or j not in layout.drawn_joints:
            continue
        c = tuple(int(v) for v in colour.get(j, layout.joint_colors[j]))
        if bridged:
            a, b = j2[p], j2[j]
            for s in np.linspace(0, 1, 9)[::2]:
                cv2.line(img, _pt(a + (b - a) * s), _pt(a + (b - a) * min(s + 0.125, 1)), c, width, cv2.LINE_AA)
        else:
            cv2.line(img, _pt(j2[p]), _pt(j2[j]), c, width, cv2.LINE_AA)
    for j in np.flatnonzero(ok):
        cv2.circle(img, _pt(j2[j]), width + 1, tuple(int(v) for v in layout.joint_colors[j]), -1, cv2.LINE_AA)


def draw_hands(img: np.ndarray, h2: np.ndarray, hconf: np.ndarray, width: int) -> None:
    from models.skeleton import HAND_LIMB_COLORS, HAND_LIMBS

    for s in range(2):
        if hconf[s].max() <= MIN_CONF:
            continue
        for (a, b), c in zip(HAND_LIMBS, HAND_LIMB_COLORS):
            cv2.line(img, _pt(h2[s, a]), _pt(h2[s, b]), tuple(int(v) for v in c), max(1, width // 2), cv2.LINE_AA)


def draw_head_axes(img: np.ndarray, center: np.ndarray, R: np.ndarray, radius: float) -> None:
    """The head frame's axes (x: to the subject's left ear, red; y: to the chin, green; z: into the
    head, blue) drawn orthographically from the head centre, one radius long."""
    for k, c in ((2, (0, 0, 255)), (1, (0, 255, 0)), (0, (255, 0, 0))):
        cv2.arrowedLine(img, _pt(center), _pt(center + radius * R[:2, k]), c, 2, cv2.LINE_AA, tipLength=0.15)


def _label(img, text, org, scale=0.45):
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def refs_panel(sample: dict, height: int) -> np.ndarray | None:
    """The clip's references stacked in a column of the video's height, each labelled."""
    tiles = []
    roles = [r for r in schema.REF_ROLES if f"ref_{r}" in sample]
    if not roles:
        return None
    cell = height // len(roles)
    for r in roles:
        img = cv2.cvtColor(cv2.imdecode(np.frombuffer(sample[f"ref_{r}"], np.uint8), cv2.IMREAD_COLOR),
                           cv2.COLOR_BGR2RGB)
        s = cell / img.shape[0]
        img = cv2.resize(img, (max(1, int(img.shape[1] * s)), cell), interpolation=cv2.INTER_AREA)
        meta = sample.get("meta", {})
        yaw, sim = meta.get(f"ref_{r}_yaw"), meta.get(f"ref_{r}_sim")
        _label(img, r + (f" yaw {yaw:+.0f}" if yaw is not None else ""), (4, 16))
        if sim is not None:
            _label(img, f"sim {sim:.2f}", (4, 34))
        tiles.append(img)
    w = max(t.shape[1] for t in tiles)
    col = np.zeros((height, w, 3), np.uint8)
    for i, t in enumerate(tiles):
        col[i * cell:i * cell + t.shape[0], :t.shape[1]] = t
    return col


def render_preview(sample: dict) -> np.ndarray:
    """Overlay frames (T, H, W', 3) of one clip: annotations on the video, references on the right."""
    frames = decode_mp4(sample["video"])
    T, H, W = frames.shape[:3]
    width = max(2, round(min(H, W) / 160))
    out = frames.copy()
    if "head_center" in sample:
        from models.render import render_head_sphere_map  # torch: only for a clip with a head (~2 s of imports)

        sphere = render_head_sphere_map(sample["head_center"], sample["head_rotation"], sample["head_radius"],
                                        (H, W), valid=sample["head_valid"])
        on = sphere.any(-1, keepdims=True)
        out = np.where(on, (0.55 * sphere + 0.45 * out).astype(np.uint8), out)
    faces = decode_mp4(sample["face"]) if "face" in sample else None
    meta = sample.get("meta", {})
    for t in range(T):
        img = out[t]
        if "subject_box" in sample and sample["subject_valid"][t]:
            b = sample["subject_box"][t]
            cv2.rectangle(img, _pt(b[:2]), _pt(b[2:]), (200, 200, 200), 1)
        if "body_joints2d" in sample:
            draw_body(img, sample["body_joints2d"][t], sample["body_conf"][t], width)
        if "hand_joints2d" in sample:
            draw_hands(img, sample["hand_joints2d"][t], sample["hand_conf"][t], width)
        if "head_valid" in sample and sample["head_valid"][t]:
            draw_head_axes(img, sample["head_center"][t], sample["head_rotation"][t], float(sample["head_radius"][t]))
            y, p, r = sample["head_ypr"][t]
            _label(img, f"yaw {y:+.0f} pitch {p:+.0f} roll {r:+.0f}", (6, H - 10))
        if "face_valid" in sample and sample["face_valid"][t]:
            b = sample["face_box"][t]
            cv2.rectangle(img, _pt(b[:2]), _pt(b[2:]), (255, 255, 0), 1)
        if faces is not None:
            s = min(H, W) // 4
            img[:s, W - s:] = cv2.resize(faces[t], (s, s), interpolation=cv2.INTER_AREA)
        n = int(sample["person_count"][t]) if "person_count" in sample else -1
        _label(img, f"{sample['key']} t={t} {meta.get('shot_scale', '')} people={n}", (6, 16))
    panel = refs_panel(sample, H)
    if panel is not None:
        out = np.concatenate([out, np.repeat(panel[None], T, axis=0)], axis=2)
    if out.shape[2] % 2:
        out = out[:, :, :-1]
    return out


def preview_path(output: str, key: str) -> str:
    """``{output}/previews/{key}.mp4`` (``./{key}.mp4`` for an object-store output); ``key`` must be a clip key
    (:func:`preprocess.schema.check_key`), so the path stays inside that folder."""
    storage = Storage(output, create=False)
    folder = storage.path("previews") if storage.local else "."
    path = os.path.join(folder, f"{schema.check_key(key)}.mp4")
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
        raise ValueError(f"preview of {key!r} would be written outside {folder}")
    return path


def write_preview(output: str, key: str | None = None, out: str | None = None) -> str:
    """Render the preview of a clip and write it as H.264 MP4; returns its path."""
    sample = load_clip(output, key)
    frames = render_preview(sample)
    path = out or preview_path(output, sample["key"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode_mp4(frames, float(sample.get("meta", {}).get("fps", 25.0)), crf=20))
    return path


def main(argv: list[str]) -> int:
    args = {}
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__)
            return 0
        k, eq, v = a.partition("=")
        if not eq or k not in ("output", "key", "out"):
            print(f"error: unknown argument {a!r}\n{__doc__}", file=sys.stderr)
            return 2
        args[k] = v
    if "output" not in args:
        print(f"error: output= is required\n{__doc__}", file=sys.stderr)
        return 2
    path = write_preview(args["output"], args.get("key"), args.get("out"))
    print(f"[preview] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
