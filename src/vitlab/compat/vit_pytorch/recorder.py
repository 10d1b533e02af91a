"""vit-pytorch's ``Recorder`` (``vit_pytorch.recorder``) on any vitlab model, built on ``record_attention``.

    from vitlab.compat.vit_pytorch.recorder import Recorder     # was: from vit_pytorch.recorder import Recorder
    v = Recorder(v)
    preds, attns = v(img)         # attns: (batch, layers, heads, n, n) for an isotropic ViT
    v = v.eject()                 # the model, exactly as it was

The maps are the attention probabilities that vitlab's attention modules hand to ``record_attention`` (softmax
probabilities after the logit / probability modifiers, before attention dropout; the implied N x N matrix for
FLatten's focused linear attention; XCiT's ``(d, d)`` channel attention for the cross-covariance core;
differential attention's signed ``softmax1 - lambda softmax2``).  Attention in the sense of "Attention Is All You
Need" (Vaswani et al., NeurIPS 2017, sec. 3.2.1) and ViT (Dosovitskiy et al., ICLR 2021, sec. 3.1, eq. 2-3).
"""
from __future__ import annotations

from typing import Any, List, Optional, Union

import torch
from torch import nn

from vitlab.layers.recording import record_attention

__all__ = ["Recorder"]

Maps = Union[None, torch.Tensor, List[torch.Tensor]]


def _batch_size(img: Any, pred: Any) -> Optional[int]:
    """The number of images of one call: the rows of the predictions (NaViT packs several images per sequence)."""
    for t in (pred, img):
        if torch.is_tensor(t) and t.ndim > 0:
            return t.shape[0]
    return None


def stack_maps(maps: List[torch.Tensor], batch: Optional[int]) -> Maps:
    """vit-pytorch's ``(batch, layers, heads, n, n)`` when every map is one shape with a row per image; else the list
    (pyramids, windows: ``(batch * windows, heads, n_q, n_k)`` per map); ``None`` when nothing was recorded."""
    if not maps:
        return None
    first = maps[0].shape
    if all(m.shape == first for m in maps) and first[0] == batch:
        return torch.stack(maps, dim=1)
    return list(maps)


class Recorder(nn.Module):
    """Wraps ``vit`` (any vitlab model) so that ``forward(img)`` returns ``(predictions, attention maps)``, with
    vit-pytorch's arguments (``device``: where the maps go, default where they were computed).

    The maps come in module order (``model.named_modules()``; a module called twice in a forward gives two maps, in
    call order): one tensor ``(batch, layers, heads, n, n)`` when every map has one shape ``(batch, heads, n, n)``
    (every isotropic model with one kind of attention: ViT, DeiT, DeepViT, T2T's transformer, ...), else a **list**
    of ``(B', heads, n_q, n_k)`` tensors, ``B' = batch * groups`` for window / stripe attention (Swin, CSwin, MaxViT,
    NesT, Twins), pyramids whose maps change size (PVT, PiT, CvT), class attention next to self-attention (CaiT,
    XCiT).  After a call, :attr:`names` and :attr:`layouts` give each map's module name and its keys'
    :class:`~vitlab.layers.TokenLayout` (or ``None``).  ``None`` when no attention ran (vit-pytorch's value too).

    Unlike vit-pytorch's, no hooks stay on the model between calls: each call records inside ``record_attention``,
    which detaches the maps and leaves the attention modules as they were, also when the forward raises.  A model
    without attention modules raises ``ValueError`` at the first call (``record_attention``'s error).
    """

    def __init__(self, vit: nn.Module, device: Union[None, str, torch.device] = None):
        super().__init__()
        if not isinstance(vit, nn.Module):
            raise ValueError(f"Recorder wraps a model (nn.Module), got {type(vit).__name__}")
        self.vit = vit
        self.device = device
        self.recordings: List[torch.Tensor] = []
        self.names: List[str] = []
        self.layouts: List[Any] = []
        self.ejected = False

    def forward(self, img: Any, *args: Any, **kwargs: Any):
        """``(self.vit(img, ...), maps)``; the maps of earlier calls are dropped first (:meth:`clear`)."""
        if self.ejected:
            raise ValueError("this Recorder has been ejected (eject() returned its model): wrap the model again")
        self.clear()
        with record_attention(self.vit, detach=True) as rec:
            pred = self.vit(img, *args, **kwargs)
        for name in rec.names:  # module order; each module's calls in call order
            self.recordings += [m if self.device is None else m.to(self.device) for m in rec.maps[name]]
            self.names += [name] * len(rec.maps[name])
            self.layouts += rec.layouts[name]
        return pred, stack_maps(self.recordings, _batch_size(img, pred))

    def clear(self) -> None:
        """Drop the maps of the last call."""
        self.recordings.clear()
        self.names.clear()
        self.layouts.clear()

    def eject(self) -> nn.Module:
        """The wrapped model (nothing of the recorder is left on it); this wrapper cannot be called again."""
        self.ejected = True
        self.clear()
        return self.vit
