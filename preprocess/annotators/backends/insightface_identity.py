"""Identity backend: insightface's ArcFace embedding (production; 512-D for the buffalo_l / antelopev2 packs).

The face is aligned the way ArcFace was trained: SCRFD's five keypoints (eyes, nose tip, mouth corners), found in
a square around the given face box, are mapped by a similarity onto insightface's 112 px template
(``face_align.norm_crop``). Where the detector finds nothing, the box itself is mapped onto the template's face
region (``box_fallback``). The embedding is returned unit-norm, so the cosine similarity of two faces is their dot
product. ``dim`` is a param (recorded in dataset.json before any model loads) and checked against the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import crop, crop_affine, iou, uncrop_points
from . import IdentityBackend
from .insightface_common import InsightFaceParams, load_pack

_KEY = "video_stages.refs.params.identity.params"


class ArcFaceIdentity(IdentityBackend):
    """ArcFace (an insightface pack's recognition model) on SCRFD-aligned faces."""

    @dataclass
    class Params(InsightFaceParams):
        dim: int = 512  # the recognition model's embedding length (checked in setup)
        det_size: int = 320  # faces here fill most of the image they are looked for in
        search_margin: float = 0.5  # the detector looks at the face box grown by this fraction per side
        box_fallback: bool = True  # no detection: align from the box (less accurate) instead of giving up

    def __init__(self, params: dict | None = None):
        super().__init__(params)
        self.dim = int(self.params.dim)

    def setup(self) -> None:
        m = load_pack(self.params, ("detection", "recognition"), f"{_KEY}.model_dir")
        self.det, self.rec = m["detection"], m["recognition"]
        got = self.rec.output_shape[-1]
        if isinstance(got, int) and got != self.dim:
            raise ValueError(f"{self.rec.model_file} gives {got}-D embeddings but {_KEY}.dim={self.dim}: set dim to "
                             f"{got} (the dataset records the length; a resumed output must keep it)")

    def _keypoints(self, bgr: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """SCRFD's five keypoints of the face best matching ``box``, image px."""
        side = max(box[2] - box[0], box[3] - box[1]) * (1 + 2 * self.params.search_margin)
        n = self.params.det_size
        A = crop_affine(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), side, n)
        boxes, kpss = self.det.detect(crop(bgr, A, n))
        if not len(boxes) or kpss is None:
            return None
        found = [uncrop_points(b[:4].reshape(2, 2).astype(np.float64), A).reshape(4) for b in boxes]
        best = int(np.argmax([iou(f, box) for f in found]))
        return uncrop_points(kpss[best].astype(np.float64), A) if iou(found[best], box) > 0.2 else None

    def embed(self, image: np.ndarray, face_box: np.ndarray) -> np.ndarray | None:
        from insightface.utils import face_align

        if not np.isfinite(face_box).all() or face_box[2] - face_box[0] < 8 or face_box[3] - face_box[1] < 8:
            return None
        bgr = np.ascontiguousarray(np.asarray(image, np.uint8)[..., ::-1])
        kps = self._keypoints(bgr, np.asarray(face_box, np.float64))
        size = self.rec.input_size[0]
        if kps is None:
            if not self.params.box_fallback:
                return None
            # the template's five points sit in the middle of a 112 px face box
            tmpl = face_align.arcface_dst
            c, s = (face_box[:2] + face_box[2:]) / 2, max(face_box[2] - face_box[0], face_box[3] - face_box[1])
            kps = (tmpl - 56.0) / 112.0 * s * 1.15 + c
        aimg = face_align.norm_crop(bgr, landmark=np.asarray(kps, np.float32), image_size=size)
        e = self.rec.get_feat(aimg).reshape(-1).astype(np.float32)
        n = float(np.linalg.norm(e))
        return e / n if n > 0 and np.isfinite(n) else None

