"""Inference and evaluation: scoring generated videos against ground truth (``metrics``: PSNR, SSIM, LPIPS, FID,
FVD in the paper-compatible and clean definitions; ``metric_nets``: the networks behind the learned ones)."""
