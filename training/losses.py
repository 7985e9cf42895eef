"""Losses: focal, multi-class soft dice, soft MCC (the competition metric), boundary, and
segmentation-models-pytorch's Lovasz-softmax and Tversky.

All are finite for batches in which a class is absent (a batch without a lake must not
produce NaN).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def class_weights_from_shares(shares: Sequence[float], power: float = 0.5, cap: float = 10.0) -> torch.Tensor:
    """Inverse-power weights from measured class shares, normalised to mean 1, capped."""
    s = np.maximum(np.asarray(shares, np.float64), 1e-6)
    w = s ** -power
    w = np.minimum(w / w.mean(), cap)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=1)
    logpt = logp.gather(1, target[:, None]).squeeze(1)
    pt = logpt.exp()
    loss = -((1 - pt) ** gamma) * logpt
    if weight is not None:
        loss = loss * weight.to(logits.device)[target]
    return loss.mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    k = logits.shape[1]
    p = torch.softmax(logits.float(), dim=1)
    t = F.one_hot(target, k).permute(0, 3, 1, 2).float()
    inter = (p * t).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + t.sum((0, 2, 3))
    return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


def soft_mcc_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - multi-class MCC of the soft confusion matrix (sklearn's R_K formula)."""
    k = logits.shape[1]
    p = torch.softmax(logits.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, k)
    t = F.one_hot(target.reshape(-1), k).float()
    n = p.new_tensor(float(t.shape[0]))
    c = (p * t).sum()
    tk, pk = t.sum(0), p.sum(0)
    cov_tp = c * n - (tk * pk).sum()
    cov_pp = n * n - (pk * pk).sum()
    cov_tt = n * n - (tk * tk).sum()
    mcc = cov_tp / torch.sqrt(cov_pp * cov_tt + eps)
    return 1.0 - mcc


def signed_distance_maps(target: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, H, W) signed distance to each class boundary, normalised by the patch diagonal:
    negative inside the class, positive outside; +1 everywhere for an absent class."""
    import cv2

    h, w = target.shape
    diag = float(np.hypot(h, w))
    out = np.ones((n_classes, h, w), np.float32)
    for k in range(n_classes):
        pos = (target == k).astype(np.uint8)
        if pos.any() and not pos.all():
            outside = cv2.distanceTransform(1 - pos, cv2.DIST_L2, 3)
            inside = cv2.distanceTransform(pos, cv2.DIST_L2, 3)
            out[k] = (outside - inside) / diag
        elif pos.all():
            out[k] = -1.0
    return out


def boundary_loss(logits: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Kervadec et al.: mean of softmax probability x signed distance map."""
    p = torch.softmax(logits.float(), dim=1)
    return (p * dist.to(p.device, torch.float32)).mean()


def lovasz_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """smp's Lovasz-softmax over the batch (classes present in it), in float32."""
    from segmentation_models_pytorch.losses import LovaszLoss

    return LovaszLoss(mode="multiclass", per_image=False, from_logits=True)(logits.float(), target)


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.3, beta: float = 0.7) -> torch.Tensor:
    """smp's Tversky loss: mean over classes of 1 - TP / (TP + alpha FP + beta FN) on the
    batch's soft counts; a class absent from the batch contributes 0."""
    from segmentation_models_pytorch.losses import TverskyLoss

    return TverskyLoss(mode="multiclass", from_logits=True, alpha=alpha, beta=beta)(logits.float(), target)


def ramped(weight: float, ramp_epochs: int, epoch: int) -> float:
    """``weight`` reached linearly over ``ramp_epochs`` (epoch 0 gets 1/ramp of it)."""
    return weight * (min(1.0, (epoch + 1) / ramp_epochs) if ramp_epochs else 1.0)


class CombinedLoss(nn.Module):
    def __init__(self, cfg, class_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("class_weight", class_weight if class_weight is not None else torch.empty(0))

    def boundary_weight(self, epoch: int) -> float:
        return ramped(self.cfg.boundary, self.cfg.boundary_ramp_epochs, epoch)

    def forward(self, logits, target, dist=None, epoch: int = 0) -> Dict[str, torch.Tensor]:
        parts: Dict[str, torch.Tensor] = {}
        w = self.class_weight if self.class_weight.numel() else None
        if self.cfg.focal:
            parts["focal"] = self.cfg.focal * focal_loss(logits, target, self.cfg.focal_gamma, w)
        if self.cfg.dice:
            parts["dice"] = self.cfg.dice * dice_loss(logits, target)
        if self.cfg.mcc:
            parts["mcc"] = self.cfg.mcc * soft_mcc_loss(logits, target)
        lw = ramped(self.cfg.lovasz, self.cfg.lovasz_ramp_epochs, epoch)
        if lw:
            parts["lovasz"] = lw * lovasz_loss(logits, target)
        tw = ramped(self.cfg.tversky, self.cfg.tversky_ramp_epochs, epoch)
        if tw:
            parts["tversky"] = tw * tversky_loss(logits, target, self.cfg.tversky_alpha, self.cfg.tversky_beta)
        bw = self.boundary_weight(epoch)
        if bw and dist is not None:
            parts["boundary"] = bw * boundary_loss(logits, dist)
        parts["total"] = sum(parts.values())
        return parts
