"""Annotators: the per-frame control signals DreamActor-M1 trains on (paper 3.2-3.3), as pipeline stages.

Clip stages (run in order on each decoded clip, ``conf/annotators/<name>.yaml: annotators``):

* ``body.BodyStage``: main-subject tracking and SMPL-X-ordered body joints in the camera frame;
* ``hands.HandsStage``: 21 joints per hand from crops around the body's wrists;
* ``head.HeadStage``: head rotation / head-sphere parameters and 224×224 face crops.

Video stage (run in the shard writer on all clips of a video, ``video_stages``):

* ``refs.YawSortedRefsStage``: identity embedding, yaw-sorted references, half-body reference.

Each stage runs a backend of its kind (``backends/``: body, hands, head, identity) chosen in the
config; geometry conventions (camera, head angles) are in ``geometry.py``; model files and their
sha256 in ``assets.py`` (``python -m preprocess.annotators.assets`` checks them).
"""
