"""vit-pytorch's ``vit_pytorch.dino.Dino`` on vitlab's DINO (:class:`vitlab.pretrain.dino.DINO`) and its
multi-crop augmentation (:class:`vitlab.pretrain.crops.MultiCrop`)."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
from torch import nn
from torchvision.transforms.v2.functional import to_pil_image

from vitlab.compat.vit_pytorch._args import encoder_input, refuse
from vitlab.pretrain.crops import MultiCrop, default_local_size
from vitlab.pretrain.dino import DINO

__all__ = ["Dino"]

LOCAL_CROPS = 2  # vit-pytorch's two local views


def _takes_size(net: nn.Module, chans: int, size: int) -> bool:
    """Whether ``net`` runs on ``size`` px images (``dynamic_img_size``: it resamples its position table)."""
    was = net.training
    try:
        with torch.no_grad():
            net.eval().forward_features(torch.zeros(1, chans, size, size))
        return True
    except (ValueError, RuntimeError):
        return False
    finally:
        net.train(was)


def _check(image_size: int, side: int, hidden_layer, projection_layers: int, augment_fn, augment_fn2,
           scales: dict, rates: dict) -> None:
    """vit-pytorch's arguments vitlab cannot honour, one ``ValueError`` each."""
    if image_size != side:
        raise refuse("Dino", "image_size", image_size, f"the net's input size {side}")
    if hidden_layer not in (-2, "to_latent"):
        raise refuse("Dino", "hidden_layer", hidden_layer, "'to_latent' or -2 (the pooled pre-logits, "
                     "forward_head(pre_logits=True))")
    if projection_layers != 4:
        raise refuse("Dino", "projection_layers", projection_layers, "4 (DINO's 3-layer MLP + last layer)")
    for arg, fn in (("augment_fn", augment_fn), ("augment_fn2", augment_fn2)):
        if fn is not None:
            raise refuse("Dino", arg, fn, "None (vitlab applies DINO's multi-crop augmentation to every crop)")
    for arg, value in scales.items():
        if not 0.05 <= value <= 1.0:
            raise refuse("Dino", arg, value, "an area fraction in [0.05, 1] (local crops start at 0.05)")
    for arg, value in rates.items():
        if not 0.0 <= value <= 1.0:
            raise refuse("Dino", arg, value, "a decay in [0, 1]")


class Dino(DINO):
    """DINO ("Emerging Properties in Self-Supervised Vision Transformers", Caron et al., ICCV 2021, Algorithm 1)
    with vit-pytorch's arguments: ``learner = Dino(model, image_size=256, hidden_layer='to_latent', ...)``;
    ``loss = learner(images)``; ``loss.backward()``; ``opt.step()``; ``learner.update_moving_average()``.

    Mapping: ``net`` -> the student backbone (trained in place; the teacher is a copy), its features the pooled
    pre-logits (``hidden_layer='to_latent'`` or ``-2``); ``projection_hidden_size`` -> the head's hidden and
    bottleneck width, ``projection_layers=4`` -> its 3-layer MLP + last layer (same parameter count);
    ``num_classes_K`` -> ``out_dim``; ``student_temp``, ``teacher_temp`` (constant), ``center_moving_average_decay``
    -> the loss's; ``moving_average_decay`` -> the teacher's EMA momentum (constant, as vit-pytorch's);
    ``global_lower_crop_scale`` / ``local_upper_crop_scale`` -> crop areas ``(g, 1)`` / ``(0.05, u)``.
    ``update_moving_average()`` moves the teacher, ``reset_moving_average()`` copies the student into it;
    ``learner(x, return_embedding=True)`` returns the student's ``(projection, embedding)``.

    Follows the paper where vit-pytorch does not:

    * the views: images in [0, 1] (as 8-bit images) get DINO's augmentation per image (flip, colour jitter,
      grey, blur, solarisation; :class:`~vitlab.pretrain.crops.MultiCrop`, normalised by the net's
      ``pretrained_cfg`` mean and std); the teacher sees 2 global crops, the student both global crops and 2 local crops,
      of the paper's 96/224 size when the net takes it (``dynamic_img_size``), else resized to ``image_size`` as
      vit-pytorch's (``local_size`` says which); vit-pytorch crops the whole batch alike and shows the student the
      local crops only;
    * the loss averages the cross-entropy over every pair of different views (vit-pytorch: the two
      global/local pairs); the centre moves in every forward (vit-pytorch: in ``update_moving_average``);
    * the head's last layer is weight-normalised with its norm fixed to 1 and there is no GELU before the L2
      norm (vit-pytorch: a plain Linear with bias).
    The paper's schedules (teacher temperature warm-up, cosine EMA momentum, gradient clipping, last-layer freeze)
    are ``vitlab pretrain --method dino``'s; here they are constant, as vit-pytorch's.
    """

    def __init__(self, net: nn.Module, image_size: int, hidden_layer=-2, projection_hidden_size: int = 256,
                 num_classes_K: int = 65336, projection_layers: int = 4, student_temp: float = 0.9,
                 teacher_temp: float = 0.04, local_upper_crop_scale: float = 0.4, global_lower_crop_scale: float = 0.5,
                 moving_average_decay: float = 0.9, center_moving_average_decay: float = 0.9,
                 augment_fn: Optional[nn.Module] = None, augment_fn2: Optional[nn.Module] = None):
        _, side, chans = encoder_input("Dino", "net", net)
        _check(image_size, side, hidden_layer, projection_layers, augment_fn, augment_fn2,
               dict(local_upper_crop_scale=local_upper_crop_scale, global_lower_crop_scale=global_lower_crop_scale),
               dict(moving_average_decay=moving_average_decay, center_moving_average_decay=center_moving_average_decay))
        for arg, t in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
            if t <= 0:
                raise refuse("Dino", arg, t, "a positive temperature")
        local = default_local_size(side, side // net.grid_size[0])
        if local < side and not _takes_size(net, chans, local):  # a fixed-size net: vit-pytorch's full-size crops
            local = side
        local_crops = LOCAL_CROPS
        # one epoch of one step: the temperature and momentum schedules are constant (one entry each)
        super().__init__(net, copy.deepcopy(net), net.num_features, 2 + local_crops, epochs=1, steps_per_epoch=1,
                         out_dim=num_classes_K, hidden_dim=projection_hidden_size,
                         bottleneck_dim=projection_hidden_size, norm_last_layer=True, teacher_temp=teacher_temp,
                         warmup_teacher_temp=teacher_temp, warmup_teacher_temp_epochs=0, student_temp=student_temp,
                         center_momentum=center_moving_average_decay, momentum_teacher=moving_average_decay,
                         clip_grad=0.0, freeze_last_layer=0)
        cfg = net.pretrained_cfg
        self.local_crops, self.local_size = local_crops, local
        self.augment = MultiCrop(side, chans, cfg["mean"], cfg["std"], local_crops, local,
                                 (global_lower_crop_scale, 1.0), (0.05, local_upper_crop_scale))
        self.last: dict = {}

    @property
    def net(self) -> nn.Module:
        """The student's backbone: the ``net`` passed in (vit-pytorch's ``learner.net``)."""
        return self.student.backbone

    def multi_crop(self, images: torch.Tensor) -> List[torch.Tensor]:
        """``[global_1, global_2, local_1, ...]`` batches, each image augmented on its own."""
        views = [self.augment(to_pil_image(img.detach().float().clamp(0, 1).cpu())) for img in images]
        return [torch.stack(crops).to(images.device) for crops in zip(*views)]

    @contextmanager
    def _temperatures(self, student_temp: Optional[float], teacher_temp: Optional[float]) -> Iterator[None]:
        """vit-pytorch's per-call temperatures, restored afterwards."""
        saved = self.loss.student_temp, self.loss.temperatures
        if student_temp is not None:
            self.loss.student_temp = student_temp
        if teacher_temp is not None:
            self.loss.temperatures = [teacher_temp]
        try:
            yield
        finally:
            self.loss.student_temp, self.loss.temperatures = saved

    def forward(self, x: torch.Tensor, return_embedding: bool = False, return_projection: bool = True,
                student_temp: Optional[float] = None, teacher_temp: Optional[float] = None):
        """The DINO loss on a batch of images in [0, 1] (or the student's embedding, as vit-pytorch's)."""
        if return_embedding:
            embed = self.student.features(x)
            return (self.student.head(embed), embed) if return_projection else embed
        crops = self.multi_crop(x)
        self.last = dict(crops=crops, center=self.loss.center.clone())
        with self._temperatures(student_temp, teacher_temp):
            return super().forward(crops)

    def update_moving_average(self) -> None:
        """``teacher = m * teacher + (1 - m) * student`` with ``m = moving_average_decay``."""
        self.after_step(0)

    def reset_moving_average(self) -> None:
        """The teacher becomes a copy of the student again (vit-pytorch rebuilds it)."""
        self.teacher.load_state_dict(self.student.state_dict())
