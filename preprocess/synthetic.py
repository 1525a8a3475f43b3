"""Made-up annotated rows: what the annotator stages hand the shard writer for one video, consistent but not computed
by any model (two real people's face crops, a half-body skeleton, random yaw). For benchmarks and tests of the writer
and the per-video stages (references) that must not pay for annotation: ``bench/memory.py``, tests/preprocess."""
from __future__ import annotations

import cv2
import numpy as np

from . import demo_media, schema
from .stage import fail, new_row
from .video import encode_mp4

# photo -> centre and side of its face crop: the face box dlib finds, grown by face_margin 0.3 per side
FACES = {"grace_hopper": ((273, 232), 298), "astronaut": ((220, 121), 144)}
# height of each body joint in a standing half-body skeleton, as a fraction of the frame (x: the middle)
_JOINT_Y = {"nose": 0.15, "left_eye": 0.15, "right_eye": 0.15, "left_ear": 0.15, "right_ear": 0.15, "head": 0.15,
            "neck": 0.3, "left_hip": 0.65, "right_hip": 0.65}


def face_crops(photo: str, n: int) -> bytes:
    """The face of a shipped photo as ``n`` 224 px face crops (moving by a few pixels), an MP4 like the head stage's."""
    (cx, cy), side = FACES[photo]
    img, s = demo_media.load_photo(photo), schema.FACE_CROP_SIZE / side
    frames = [cv2.warpAffine(img, np.array([[s, 0, 112 - (cx + 3 * np.sin(t / 3)) * s],
                                            [0, s, 112 - (cy + 3 * np.cos(t / 4)) * s]]), (224, 224))
              for t in range(n)]
    return encode_mp4(np.stack(frames), 25.0, crf=30, preset="ultrafast", threads=1)


def annotated_rows(video_key: str, n_clips: int, n_frames: int = 24, size: int = 64, seed: int = 0):
    """The clip rows of one annotated video, one at a time, as the sink hands them to a writer: every field of the
    annotator groups, made up but consistent (a person in most frames, random yaw, a half-body skeleton), the face
    crops of two real people (clips alternate between them: two identities), clips 0 and 3 of every 4 full body;
    clip 5 shows nobody (the person check fails it) and clip 6 failed before the writer."""
    rng = np.random.default_rng(seed)
    T, J, H = n_frames, schema.N_BODY, schema.N_HAND
    faces = {p: face_crops(p, T) for p in FACES}
    skeleton = np.array([(0.5, _JOINT_Y.get(n, 0.4)) for n in schema.BODY_JOINT_NAMES], np.float32)
    for c in range(n_clips):
        f0 = c * T
        fi = np.arange(f0, f0 + T, dtype=np.int32)
        video = rng.integers(0, 255, (T, size, size, 3), dtype=np.uint8)
        valid = (rng.random(T) > 0.1).astype(np.uint8) * (c != 5)
        yaw = rng.uniform(-70, 70, T).astype(np.float32)
        j2 = (skeleton[None] + rng.normal(0, 0.01, (T, J, 2))).astype(np.float32) * size
        row = new_row(
            key=schema.clip_key(video_key, c), video_key=video_key, source=f"/in/{video_key}.mp4", source_size=10**6,
            source_mtime=1.0, source_seconds=n_clips * T / 25, n_clips=n_clips, clip_index=c, shot_index=c // 4,
            frame_index=fi, timestamps=fi / 25.0, fps=25.0, width=size, height=size, start_frame=f0,
            end_frame=f0 + T - 1, n_frames=T, src_fps=25.0, src_width=size, src_height=size, src_codec="h264",
            src_rotation=0, audio_status="no_audio_stream",
            video=encode_mp4(video, 25.0, crf=30, preset="ultrafast", threads=1),
            subject_box=np.tile(np.array([8, 4, 56, 60], np.float32), (T, 1)), subject_valid=valid,
            person_count=valid.copy(), camera_K=np.tile(np.eye(3, dtype=np.float32), (T, 1, 1)),
            body_joints3d=rng.normal(0, 1, (T, J, 3)).astype(np.float32), body_joints2d=j2,
            body_conf=rng.uniform(0.2, 1, (T, J)).astype(np.float32), body_filled=np.ones(J, np.uint8),
            body_fit_px=rng.uniform(0, 2, T).astype(np.float32),
            hand_joints3d=rng.normal(0, 1, (T, 2, H, 3)).astype(np.float32),
            hand_joints2d=rng.uniform(0, size, (T, 2, H, 2)).astype(np.float32),
            hand_conf=rng.uniform(0, 1, (T, 2, H)).astype(np.float32),
            head_rotation=np.tile(np.eye(3, dtype=np.float32), (T, 1, 1)),
            head_ypr=np.stack([yaw, rng.uniform(-10, 10, T), rng.uniform(-10, 10, T)], 1).astype(np.float32),
            head_center=rng.uniform(20, 40, (T, 2)).astype(np.float32), head_radius=np.full(T, 6, np.float32),
            head_translation=rng.normal(0, 1, (T, 3)).astype(np.float32), head_scale=np.full(T, 60, np.float32),
            head_valid=valid.copy(), face=faces[("grace_hopper", "astronaut")[c % 2]],
            face_box=np.tile(np.array([20, 10, 44, 34], np.float32), (T, 1)), face_valid=valid.copy(),
            face_landmarks=rng.uniform(0, size, (T, 478, 3)).astype(np.float16),
            face_blendshapes=rng.uniform(0, 1, (T, 52)).astype(np.float16),
            m_shot_scale="full_body" if c % 4 in (0, 3) else "upper_body", m_face_margin=0.3,
            m_yaw_mean=float(yaw.mean()), timings={"decode": 0.01, "head": 0.02}, stage_frames={})
        if c == 6:
            fail(row, "head", "no face landmarker today", "RuntimeError")
        yield row


REFS_GROUPS = ["subject", "body", "hands", "head", "face", "refs"]  # what annotated_rows carries, with references


def writer_peak(out, refs, n_clips: int, n_frames: int = 24, size: int = 64) -> int:
    """Peak bytes (tracemalloc) a shard writer with the references stage ``refs`` (a StageSpec) allocates while the
    ``n_clips`` annotated clips of one video arrive, one per call and freshly deserialised as from Ray, and are
    written."""
    import pickle
    import tracemalloc

    from preprocess.writer import ShardWriter

    arriving = [pickle.dumps([r]) for r in annotated_rows("00000000000000aa", n_clips, n_frames=n_frames, size=size)]
    w = ShardWriter(str(out), 0, "run", 1 << 40, REFS_GROUPS, {"refs": refs})
    tracemalloc.start()
    try:
        for blob in arriving:
            w.add(pickle.loads(blob))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        w.close()
