"""Inference and evaluation: the animation job (``run``, ``animate``, ``annotate``, ``pseudo_refs``,
``video_out``), the evaluation job (``evaluate``), and scoring generated videos against ground truth
(``metrics``: PSNR, SSIM, LPIPS, FID, FVD in the paper-compatible and clean definitions; ``metric_nets``: the
networks behind the learned ones)."""
