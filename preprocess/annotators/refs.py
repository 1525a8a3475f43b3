"""Yaw-sorted references and identity consistency, per source video (paper 3.3).

Runs in the shard writer once every clip of a video has been annotated. For each clip:

* person check: a clip where neither the body nor the face found anyone fails with ``NoPersonError``,
  one with a person in fewer than ``min_person_frac`` of its frames with ``SubjectLostError``; when
  no clip of the video is left, the whole video fails with that reason;
* ``identity``: the mean (unit-norm) identity embedding of the clip's most frontal faces;
* references: the yaw of every annotated frame of the video (``scope: video``; or of the clip's shot)
  is sorted, and the frames at maximum, minimum and median yaw become ``ref_yaw_max/min/median``
  (full frames, JPEG). Walking each role's order, a candidate whose face is less similar than
  ``min_similarity`` to the clip's identity is skipped (another character of the video); after
  ``max_candidates`` rejections the role falls back to the clip's own frame of that yaw rank;
* ``ref_half_body``: for full-body clips, one random frame of the subject (seeded by the clip key),
  cropped from the top of the head to the hips at a 3:4 portrait aspect.

Each role's source frame index, yaw and similarity go to meta.json and the index as ``m_ref_*``.
"""
from __future__ import annotations

import io
import zlib
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


class NoPersonError(RuntimeError):
    """No person was found in any frame (of a clip, or of the whole video)."""


class SubjectLostError(RuntimeError):
    """The subject was found in too few frames."""


@dataclass
class Candidate:
    row: int  # index into the video's rows
    t: int  # frame of that clip
    yaw: float


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

    # ---- per video ---------------------------------------------------------------------------
    def process_video(self, rows: list[dict]) -> None:
        rows = self._person_check(rows)
        # per-video caches: decoded face crops per clip, embeddings and decoded frames per (clip, frame)
        self._rows = rows
        self._faces: dict[int, np.ndarray] = {}
        self._emb: dict[tuple[int, int], np.ndarray | None] = {}
        self._frames: dict[tuple[int, int], np.ndarray] = {}
        self._ident_frame: dict[int, Candidate] = {}  # the most frontal face of each clip
        try:
            idents = [self._clip_identity(i) for i in range(len(rows))]
            for i in range(len(rows)):
                self._annotate(i, idents)
        finally:
            self._rows, self._faces, self._emb, self._frames, self._ident_frame = [], {}, {}, {}, {}

    def _person_check(self, rows: list[dict]) -> list[dict]:
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
        pool = [Candidate(j, int(t), float(rows[j]["head_ypr"][t, 0]))
                for j in same for t in np.flatnonzero(rows[j]["head_valid"] & rows[j]["face_valid"])]
        own = [c for c in pool if c.row == i]
        row["m_ref_pool"] = len(pool)
        fallbacks = 0
        for role in ROLES:
            pick, sim = self._first_match(_yaw_order(pool, role), ident)
            if pick is None:  # nothing of the video matched: the clip's own frames of that rank
                fallbacks += 1
                pick, sim = self._first_match(_yaw_order(own, role), ident)
                if pick is None:
                    pick, sim = self._own_frame(i, role, ident)
            self._store(row, role, pick, sim)
        row["m_ref_fallbacks"] = fallbacks
        for k in ("frame", "yaw", "sim"):
            row[f"m_ref_half_body_{k}"] = None
        if row.get("m_shot_scale") == "full_body":
            self._half_body(row, pool, ident)

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
        row = self._rows[i]
        if ident is not None and i in self._ident_frame:
            c = self._ident_frame[i]
            return c, float(self._embedding(c) @ ident)
        valid = np.flatnonzero(row["head_valid"])
        if len(valid):
            return _yaw_order([Candidate(i, int(t), float(row["head_ypr"][t, 0])) for t in valid], role)[0], None
        valid = np.flatnonzero((np.asarray(row["subject_valid"]) > 0) | (np.asarray(row["face_valid"]) > 0))
        t = valid[{"yaw_max": 0, "yaw_min": -1, "yaw_median": len(valid) // 2}[role]]
        return Candidate(i, int(t), float("nan")), None

    def _store(self, row: dict, role: str, c: Candidate, sim: float | None) -> None:
        row[f"ref_{role}"] = self._jpeg(self._frame(c))
        row[f"m_ref_{role}_frame"] = int(self._rows[c.row]["frame_index"][c.t])
        row[f"m_ref_{role}_yaw"] = finite_or_none(c.yaw)
        row[f"m_ref_{role}_sim"] = sim

    # ---- identity ----------------------------------------------------------------------------
    def _clip_identity(self, i: int) -> np.ndarray | None:
        """Mean unit embedding of the clip's most frontal faces; None when no face embeds."""
        row = self._rows[i]
        valid = np.flatnonzero(row["face_valid"])
        order = valid[np.argsort(np.abs(row["head_ypr"][valid, 0]), kind="stable")]  # most frontal first
        cands = [Candidate(i, int(t), float(row["head_ypr"][t, 0])) for t in order[: self.params.identity_frames * 2]]
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
            if c.row not in self._faces:
                self._faces[c.row] = _decode(row["face"])
            crop = self._faces[c.row][c.t]
            n = crop.shape[0]
            inner = n / (1 + 2 * float(row.get("m_face_margin", 0.0)))  # the tight face box inside the crop
            box = np.array([n - inner, n - inner, n + inner, n + inner]) / 2
            self._emb[key] = self.identity.embed(crop, box)
        return self._emb[key]

    # ---- images ------------------------------------------------------------------------------
    def _frame(self, c: Candidate) -> np.ndarray:
        key = (c.row, c.t)
        if key not in self._frames:
            self._frames[key] = _decode(self._rows[c.row]["video"], [c.t])[0]
        return self._frames[key]

    def _jpeg(self, rgb: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(self.params.jpeg_quality)])
        if not ok:
            raise RuntimeError("JPEG encoding of a reference failed")
        return buf.tobytes()

    def _half_body(self, row: dict, pool: list[Candidate], ident: np.ndarray | None) -> None:
        """One random frame of the subject cropped to a half-body portrait (paper 3.3)."""
        rows = self._rows
        rng = np.random.default_rng(zlib.crc32(row["key"].encode()))
        usable = [c for c in pool if self.half_body_box(rows[c.row], c.t) is not None]
        pick, sim = self._first_match([usable[k] for k in rng.permutation(len(usable))], ident)
        if pick is None:
            return  # optional field: left out rather than filled with another person or a bad crop
        x0, y0, x1, y1 = self.half_body_box(rows[pick.row], pick.t)
        frame = self._frame(pick)
        A = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]])
        img = cv2.warpAffine(frame, A, (int(round(x1 - x0)), int(round(y1 - y0))), borderMode=cv2.BORDER_CONSTANT)
        row["ref_half_body"] = self._jpeg(img)
        row["m_ref_half_body_frame"] = int(rows[pick.row]["frame_index"][pick.t])
        row["m_ref_half_body_yaw"] = finite_or_none(pick.yaw)
        row["m_ref_half_body_sim"] = sim

    def half_body_box(self, row: dict, t: int) -> tuple[float, float, float, float] | None:
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


def _yaw_order(cands: list[Candidate], role: str) -> list[Candidate]:
    """Candidates in the order a role wants them: highest yaw first, lowest first, or nearest the median."""
    if not cands:
        return []
    yaw = np.array([c.yaw for c in cands])
    key = {"yaw_max": -yaw, "yaw_min": yaw, "yaw_median": np.abs(yaw - np.median(yaw))}[role]
    return [cands[k] for k in np.argsort(key, kind="stable")]


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
