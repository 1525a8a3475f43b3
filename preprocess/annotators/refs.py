"""Yaw-sorted references and identity consistency, per source video (paper 3.3).

Runs in the shard writer once every clip of a video has been annotated. For each clip:

* person check: a clip where neither the body nor the face found anyone fails with ``NoPersonError``,
  one with a person in fewer than ``min_person_frac`` of its frames with ``SubjectLostError``; when
  no clip of the video is left, the whole video fails with that reason;
* ``identity``: the mean (unit-norm) identity embedding of the clip's most frontal faces (its length is the identity
  backend's, recorded in dataset.json ``dims.identity_dim``);
* references: the yaw of every annotated frame of the video (``scope: video``; or of the clip's shot)
  is sorted, and the frames at maximum, minimum and median yaw become ``ref_yaw_max/min/median``
  (full frames, JPEG). Walking each role's order, a candidate whose face is less similar than
  ``min_similarity`` to the clip's identity is skipped (another character of the video); after
  ``max_candidates`` rejections the role falls back to the clip's own frame of that yaw rank;
* ``ref_half_body``: for full-body clips, one random frame of the subject (seeded by the clip key),
  cropped from the top of the head to the hips at a 3:4 portrait aspect.

Each role's source frame index, yaw and similarity go to meta.json and the index as ``m_ref_*``.

Memory is bounded by a clip, not by the video: the rows' heavy values may live on disk (the writer's
``spill.SpilledRow``), so each clip's per-frame arrays are read once into a compact per-video table (yaw, validity
and the candidate frames: ~30 bytes a frame), face crops are decoded one clip at a time, a few decoded frames are kept
for references that several clips share, and only the identity embeddings (512 bytes a face) are kept for the video.
"""
from __future__ import annotations

import io
import zlib
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from ..schema import BODY_JOINT_NAMES
from ..stage import VideoStage, fail
from ..video import iter_frames
from .backends import IdentityBackend, load_backend
from .common import finite_or_none, frac

ROLES = ("yaw_max", "yaw_min", "yaw_median")
_J = {n: i for i, n in enumerate(BODY_JOINT_NAMES)}
_HEAD_PTS = [_J[n] for n in ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "head")]
_SHOULDERS = [_J["left_shoulder"], _J["right_shoulder"]]
_HIPS = [_J["left_hip"], _J["right_hip"]]
_FRAMES_KEPT = 8  # decoded reference frames kept per video (most clips of a video share their references)


class NoPersonError(RuntimeError):
    """No person was found in any frame (of a clip, or of the whole video)."""


class SubjectLostError(RuntimeError):
    """The subject was found in too few frames."""


@dataclass
class Candidate:
    row: int  # index into the video's rows
    t: int  # frame of that clip
    yaw: float


@dataclass
class ClipFrames:
    """The per-frame values of one clip that the references consult for every clip of the video, read once from
    its row (a row's array may be a file read)."""

    yaw: np.ndarray  # head yaw per frame, degrees (head_ypr[:, 0])
    head_valid: np.ndarray
    face_valid: np.ndarray
    subject_valid: np.ndarray

    @classmethod
    def of(cls, row: Mapping) -> ClipFrames:
        return cls(np.array(row["head_ypr"][:, 0]), np.array(row["head_valid"]), np.array(row["face_valid"]),
                   np.array(row["subject_valid"]))


class YawSortedRefsStage(VideoStage):
    """``ref_yaw_max/min/median``, ``ref_half_body`` and ``identity`` (``refs`` field group)."""

    name = "refs"
    reads = ("video", "face", "frame_index", "shot_index", "key", "subject_valid", "head_valid", "head_ypr",
             "face_valid", "body_joints2d", "body_conf", "m_shot_scale", "m_face_margin")
    writes = ("ref_yaw_max", "ref_yaw_min", "ref_yaw_median", "ref_half_body", "identity",
              *(f"m_ref_{r}_{k}" for r in (*ROLES, "half_body") for k in ("frame", "yaw", "sim")),
              "m_ref_pool", "m_ref_fallbacks", "m_identity_valid", "m_person_frac")

    @dataclass
    class Params:
        identity: dict[str, Any] = field(default_factory=dict)  # identity backend {target, params}
        scope: str = "video"  # where references come from: video (paper 3.3) | shot
        min_similarity: float = 0.9  # cosine similarity to the clip's face a reference must reach
        identity_frames: int = 2  # most frontal faces of a clip averaged into its identity embedding
        max_candidates: int = 6  # per role, candidates tried before the clip's own frame is used
        min_person_frac: float = 0.5  # clips with a person in fewer frames fail (SubjectLostError)
        min_joint_conf: float = 0.3  # joints that bound the half-body crop
        half_body_aspect: float = 0.75  # width / height of the half-body portrait
        jpeg_quality: int = 92

    def __init__(self, params: dict | None = None):
        super().__init__(params)
        if self.params.scope not in ("video", "shot"):
            raise ValueError(f"video_stages.refs.params.scope={self.params.scope!r}: use video or shot")
        self.identity: IdentityBackend = load_backend(self.params.identity, IdentityBackend,
                                                      "video_stages.refs.params.identity")  # type: ignore[assignment]

    def setup(self) -> None:
        self.identity.setup()

    def dims(self) -> dict[str, int]:
        return {"identity_dim": int(self.identity.dim)}  # the backend's embedding length (dataset.json dims)

    # ---- per video ----------------------------------------------------------------------------
    def process_video(self, rows: list[MutableMapping]) -> None:
        self._begin(self._person_check(rows))
        try:
            idents = [self._clip_identity(i) for i in range(len(self._rows))]
            for i in range(len(self._rows)):
                self._annotate(i, idents)
        finally:
            self._begin([])

    def _begin(self, rows: list[MutableMapping]) -> None:
        """The per-video state: the rows, their per-frame table and caches (none for ``[]``)."""
        self._rows = rows
        self._clips = [ClipFrames.of(r) for r in rows]
        # every frame with a head and a face, as candidates: clip, frame and yaw, in (clip, frame) order
        valid = [np.flatnonzero(c.head_valid & c.face_valid) for c in self._clips]
        none = np.zeros(0, np.int64)
        self._cand_row = np.concatenate([none, *(np.full(len(v), j) for j, v in enumerate(valid))])
        self._cand_t = np.concatenate([none, *valid])
        self._cand_yaw = np.concatenate([np.zeros(0), *(c.yaw[v] for c, v in zip(self._clips, valid))])
        self._half_body_ok: np.ndarray | None = None  # per candidate: a half-body crop exists (on first need)
        # caches: embeddings per (clip, frame); the decoded face crops of one clip; a few decoded frames
        self._emb: dict[tuple[int, int], np.ndarray | None] = {}
        self._faces: tuple[int, np.ndarray] | None = None
        self._frames: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._ident_frame: dict[int, Candidate] = {}  # the most frontal face of each clip

    def _person_check(self, rows: list[MutableMapping]) -> list[MutableMapping]:
        """Fail clips without enough person frames; raise when no clip is left."""
        kept, reasons = [], []
        for row in rows:
            person = (np.asarray(row["subject_valid"]) > 0) | (np.asarray(row["face_valid"]) > 0)
            row["m_person_frac"] = frac(person)
            if not person.any():
                err: Exception = NoPersonError(f"no person in any of the clip's {len(person)} frames")
            elif person.mean() < self.params.min_person_frac:
                err = SubjectLostError(f"person in {person.mean():.0%} of the frames, "
                                       f"below min_person_frac={self.params.min_person_frac}")
            else:
                kept.append(row)
                continue
            fail(row, self.name, err)
            reasons.append(err)
        if not kept:
            if all(isinstance(e, NoPersonError) for e in reasons):
                raise NoPersonError(f"no person in any frame of the video's {len(rows)} clips")
            raise SubjectLostError(f"the subject is visible in too few frames of every clip ({len(rows)} clips)")
        return kept

    def _annotate(self, i: int, idents: list[np.ndarray | None]) -> None:
        rows, row, ident = self._rows, self._rows[i], idents[i]
        row["identity"] = ident if ident is not None else np.zeros(self.identity.dim, np.float32)
        row["m_identity_valid"] = ident is not None
        # candidate clips: in scope and showing the same person (their identities match); each
        # candidate frame is still checked on its own face (a track can switch people)
        same = [j for j, r in enumerate(rows)
                if (self.params.scope == "video" or r.get("shot_index") == row.get("shot_index"))
                and (j == i or ident is None or (idents[j] is not None
                                                 and float(idents[j] @ ident) >= self.params.min_similarity))]
        pool = np.flatnonzero(np.isin(self._cand_row, same))  # candidates, in (clip, frame) order
        own = pool[self._cand_row[pool] == i]
        row["m_ref_pool"] = len(pool)
        fallbacks = 0
        for role in ROLES:
            pick, sim = self._first_match(self._in_yaw_order(pool, role), ident)
            if pick is None:  # nothing of the video matched: the clip's own frames of that rank
                fallbacks += 1
                pick, sim = self._first_match(self._in_yaw_order(own, role), ident)
                if pick is None:
                    pick, sim = self._own_frame(i, role, ident)
            self._store(row, role, pick, sim)
        row["m_ref_fallbacks"] = fallbacks
        for k in ("frame", "yaw", "sim"):
            row[f"m_ref_half_body_{k}"] = None
        if row.get("m_shot_scale") == "full_body":
            self._half_body(row, pool, ident)

    def _candidates(self, idx: np.ndarray) -> list[Candidate]:
        """Candidates ``idx`` of the video's table, the first ``max_candidates`` (all a role tries)."""
        return [Candidate(int(self._cand_row[k]), int(self._cand_t[k]), float(self._cand_yaw[k]))
                for k in idx[: self.params.max_candidates]]

    def _in_yaw_order(self, idx: np.ndarray, role: str) -> list[Candidate]:
        """The first candidates of ``idx`` in the order a role wants them."""
        return self._candidates(idx[_yaw_order(self._cand_yaw[idx], role)])

    def _first_match(self, ordered: list[Candidate], ident: np.ndarray | None) -> tuple[Candidate | None, float | None]:
        """The first of the first ``max_candidates`` whose face matches ``ident`` (the first when no identity)."""
        for c in ordered[: self.params.max_candidates]:
            if ident is None:
                return c, None
            e = self._embedding(c)
            if e is not None:
                sim = float(e @ ident)
                if sim >= self.params.min_similarity:
                    return c, sim
        return None, None

    def _own_frame(self, i: int, role: str, ident: np.ndarray | None) -> tuple[Candidate, float | None]:
        """Last resort: the frame the clip's identity came from (its subject for sure), else the clip's
        own frame of that yaw rank, else a frame with the person by position."""
        clip = self._clips[i]
        if ident is not None and i in self._ident_frame:
            c = self._ident_frame[i]
            return c, float(self._embedding(c) @ ident)
        valid = np.flatnonzero(clip.head_valid)
        if len(valid):
            t = int(valid[_yaw_order(clip.yaw[valid].astype(np.float64), role)[0]])
            return Candidate(i, t, float(clip.yaw[t])), None
        valid = np.flatnonzero((clip.subject_valid > 0) | (clip.face_valid > 0))
        t = valid[{"yaw_max": 0, "yaw_min": -1, "yaw_median": len(valid) // 2}[role]]
        return Candidate(i, int(t), float("nan")), None

    def _store(self, row: MutableMapping, role: str, c: Candidate, sim: float | None) -> None:
        row[f"ref_{role}"] = self._jpeg(self._frame(c))
        row[f"m_ref_{role}_frame"] = int(self._rows[c.row]["frame_index"][c.t])
        row[f"m_ref_{role}_yaw"] = finite_or_none(c.yaw)
        row[f"m_ref_{role}_sim"] = sim

    # ---- identity ----------------------------------------------------------------------------
    def _clip_identity(self, i: int) -> np.ndarray | None:
        """Mean unit embedding of the clip's most frontal faces; None when no face embeds."""
        clip = self._clips[i]
        valid = np.flatnonzero(clip.face_valid)
        order = valid[np.argsort(np.abs(clip.yaw[valid]), kind="stable")]  # most frontal first
        cands = [Candidate(i, int(t), float(clip.yaw[t])) for t in order[: self.params.identity_frames * 2]]
        cands = [c for c in cands if self._embedding(c) is not None][: self.params.identity_frames]
        if not cands:
            return None
        self._ident_frame[i] = cands[0]
        embs = [self._embedding(c) for c in cands]
        m = np.mean(embs, axis=0)
        return (m / np.linalg.norm(m)).astype(np.float32)

    def _embedding(self, c: Candidate) -> np.ndarray | None:
        key = (c.row, c.t)
        if key not in self._emb:
            row = self._rows[c.row]
            if self._faces is None or self._faces[0] != c.row:  # one clip's crops at a time
                self._faces = None
                self._faces = (c.row, _decode(row["face"]))
            crop = self._faces[1][c.t]
            n = crop.shape[0]
            inner = n / (1 + 2 * float(row.get("m_face_margin", 0.0)))  # the tight face box inside the crop
            box = np.array([n - inner, n - inner, n + inner, n + inner]) / 2
            self._emb[key] = self.identity.embed(crop, box)
        return self._emb[key]

    # ---- images ------------------------------------------------------------------------------
    def _frame(self, c: Candidate) -> np.ndarray:
        key = (c.row, c.t)
        if key in self._frames:
            self._frames.move_to_end(key)
        else:
            self._frames[key] = _decode(self._rows[c.row]["video"], [c.t])[0]
            if len(self._frames) > _FRAMES_KEPT:
                self._frames.popitem(last=False)
        return self._frames[key]

    def _jpeg(self, rgb: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(self.params.jpeg_quality)])
        if not ok:
            raise RuntimeError("JPEG encoding of a reference failed")
        return buf.tobytes()

    def _half_body(self, row: MutableMapping, pool: np.ndarray, ident: np.ndarray | None) -> None:
        """One random frame of the subject cropped to a half-body portrait (paper 3.3)."""
        rows = self._rows
        rng = np.random.default_rng(zlib.crc32(row["key"].encode()))
        usable = pool[self._half_body_candidates()[pool]]
        pick, sim = self._first_match(self._candidates(usable[rng.permutation(len(usable))]), ident)
        if pick is None:
            return  # optional field: left out rather than filled with another person or a bad crop
        x0, y0, x1, y1 = self.half_body_box(_body(rows[pick.row]), pick.t)
        frame = self._frame(pick)
        A = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]])
        img = cv2.warpAffine(frame, A, (int(round(x1 - x0)), int(round(y1 - y0))), borderMode=cv2.BORDER_CONSTANT)
        row["ref_half_body"] = self._jpeg(img)
        row["m_ref_half_body_frame"] = int(rows[pick.row]["frame_index"][pick.t])
        row["m_ref_half_body_yaw"] = finite_or_none(pick.yaw)
        row["m_ref_half_body_sim"] = sim

    def _half_body_candidates(self) -> np.ndarray:
        """Per candidate of the video, whether its frame has a half-body crop (each clip's skeleton read once)."""
        if self._half_body_ok is None:
            ok = np.zeros(len(self._cand_row), bool)
            for j, row in enumerate(self._rows):
                body = _body(row)
                for k in np.flatnonzero(self._cand_row == j):
                    ok[k] = self.half_body_box(body, int(self._cand_t[k])) is not None
            self._half_body_ok = ok
        return self._half_body_ok

    def half_body_box(self, row: Mapping, t: int) -> tuple[float, float, float, float] | None:
        """Top of the head to just below the hips, widened to the portrait aspect; None without hips/head."""
        j, c = row["body_joints2d"][t], row["body_conf"][t]
        ok = c >= self.params.min_joint_conf
        head, hips = [k for k in _HEAD_PTS if ok[k]], [k for k in _HIPS if ok[k]]
        if not row["subject_valid"][t] or not head or not hips or not ok[_J["neck"]]:
            return None
        neck, nose = j[_J["neck"]], j[head].mean(0)
        head_len = max(float(np.linalg.norm(neck - nose)), 1.0)
        top = j[head, 1].min() - 0.9 * head_len  # the crown sits about a nose-to-neck length above the face
        hip_y = j[hips, 1].mean()
        bottom = hip_y + 0.15 * (hip_y - neck[1])
        # width from the head and torso (outstretched arms may be cut: it is a portrait)
        xs = np.concatenate([j[head, 0], j[[k for k in _SHOULDERS if ok[k]], 0], j[hips, 0]])
        h = bottom - top
        w = max(xs.max() - xs.min() + 0.4 * head_len, self.params.half_body_aspect * h)
        h = max(h, w / self.params.half_body_aspect)
        cx, cy = (xs.max() + xs.min()) / 2, (top + bottom) / 2
        if h < 16:
            return None
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _yaw_order(yaw: np.ndarray, role: str) -> np.ndarray:
    """The order (indices into ``yaw``) a role wants frames in: highest yaw first, lowest first, or nearest the
    median."""
    if not len(yaw):
        return np.zeros(0, np.int64)
    key = {"yaw_max": -yaw, "yaw_min": yaw, "yaw_median": np.abs(yaw - np.median(yaw))}[role]
    return np.argsort(key, kind="stable")


def _body(row: Mapping) -> dict[str, np.ndarray]:
    """The arrays :meth:`YawSortedRefsStage.half_body_box` reads, read from the row once."""
    return {k: row[k] for k in ("body_joints2d", "body_conf", "subject_valid")}


def _decode(mp4: bytes, indices=None) -> np.ndarray:
    """Frames of an in-memory MP4; with ``indices``, only those (decoding stops after the last)."""
    if indices is None:
        return np.stack(list(iter_frames("<bytes>", fileobj=io.BytesIO(mp4))))
    want = sorted(set(int(i) for i in indices))
    got = {}
    for k, f in enumerate(iter_frames("<bytes>", fileobj=io.BytesIO(mp4))):
        if k in want:
            got[k] = f
        if k >= want[-1]:
            break
    return np.stack([got[int(i)] for i in indices])
