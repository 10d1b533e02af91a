"""vit-pytorch's ``Extractor`` (``vit_pytorch.extractor``) on any vitlab model, built on the model contract.

    from vitlab.compat.vit_pytorch.extractor import Extractor   # was: from vit_pytorch.extractor import Extractor
    v = Extractor(v)
    logits, embeddings = v(img)   # embeddings: (batch, tokens, dim), the tokens the head reads
    v = v.eject()

vit-pytorch's default (``layer_name='transformer'``) takes the output of the ViT's transformer: every token
(class token included) after the transformer's final LayerNorm, i.e. ``z_L`` before the class token is pooled
(Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, sec. 3.1, eq. 4).  vitlab's equivalent is the
contract's ``forward_features``, and here it is taken as the exact tensor ``forward_head`` consumes in the model's
own forward (so ``logits == forward_head(embeddings)``).  CrossViT (Chen, Fan & Panda, ICCV 2021) gives both
branches' normalised tokens, as vit-pytorch's ``layer_name='multi_scale_encoder'``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

__all__ = ["Extractor"]

# vit-pytorch's attribute names -> vitlab's: the head's input (None), or a module name of vitlab's model
VIT_PYTORCH_NAMES = {"transformer": None, "multi_scale_encoder": None, "to_patch_embedding": "patch_embed",
                     "mlp_head": "head"}


def _map(fn: Callable[[torch.Tensor], torch.Tensor], val: Any) -> Any:
    """``fn`` on a tensor or on every tensor of a tuple / list (returned as a tuple, as vit-pytorch's)."""
    if isinstance(val, (tuple, list)):
        return tuple(_map(fn, v) for v in val)
    return fn(val) if torch.is_tensor(val) else val


def _tensor_inputs(inputs: tuple) -> tuple:
    """A hook's positional inputs without the non-tensor ones (vitlab's blocks also take a ``TokenLayout``)."""
    return tuple(v for v in inputs if torch.is_tensor(v) or isinstance(v, (tuple, list)))


@contextmanager
def _capture_call(model: nn.Module, method: str, store: dict, key: str,
                  pick: Callable[[tuple, Any], Any]) -> Iterator[None]:
    """Within the block, ``model.<method>`` stores ``pick(args, result)`` in ``store[key]``; the method is an
    instance attribute only inside the block (deleted after, or the previous one put back)."""
    had = method in vars(model)
    before = vars(model).get(method)
    original = getattr(model, method)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        store[key] = pick(args, out)
        return out

    object.__setattr__(model, method, wrapper)
    try:
        yield
    finally:
        if had:
            object.__setattr__(model, method, before)
        else:
            object.__delattr__(model, method)


class Extractor(nn.Module):
    """Wraps ``vit`` (any vitlab model) so that ``forward(img)`` returns ``(logits, embeddings)``, with vit-pytorch's
    arguments:

    * ``layer_name`` (default ``'transformer'``): ``'transformer'`` / ``'multi_scale_encoder'`` -> the tokens the
      head consumes (``forward_features``: ``(B, tokens, dim)``, class token first where there is one; a tuple per
      branch for CrossViT; a ``(B, C, H, W)`` map for the models whose features are maps); ``'to_patch_embedding'`` ->
      ``'patch_embed'``, ``'mlp_head'`` -> ``'head'``; any other name must be a dotted name of
      ``vit.named_modules()`` (``'blocks.0'``, ``'norm'``), else ``ValueError`` listing the valid ones.
    * ``layer``: a submodule of ``vit`` to take instead (refused when it is not one).
    * ``layer_save_input``: that module's tensor inputs (a tuple, as vit-pytorch's hook gives); for
      ``'transformer'`` the tokens entering the first block (``forward_stem``: patches, prefix tokens, position table,
      dropout).
    * ``return_embeddings_only`` (here or per call): return only the embeddings.
    * ``detach`` (default True): ``clone().detach()`` the embeddings; False returns the very tensor the model used,
      with its graph.  ``device``: where the embeddings go (default: where they were computed).

    Unlike vit-pytorch's, nothing stays on the model between calls: a forward hook on a named module, or the capture
    of ``forward_head`` / ``forward_stem``'s argument for the default, lives only during the call.
    """

    def __init__(self, vit: nn.Module, device: Union[None, str, torch.device] = None, layer: Optional[nn.Module] = None,
                 layer_name: str = "transformer", layer_save_input: bool = False, return_embeddings_only: bool = False,
                 detach: bool = True):
        super().__init__()
        if not isinstance(vit, nn.Module):
            raise ValueError(f"Extractor wraps a model (nn.Module), got {type(vit).__name__}")
        self.vit = vit
        self.device = device
        self.layer_save_input = bool(layer_save_input)
        self.return_embeddings_only = bool(return_embeddings_only)
        self.detach = bool(detach)
        self.module_name = self._resolve(layer, layer_name)  # None: the head's input
        self.latents: Any = None
        self.ejected = False

    def _resolve(self, layer: Optional[nn.Module], layer_name: str) -> Optional[str]:
        """The vitlab module name the embeddings come from (None: the head's input)."""
        names = dict(self.vit.named_modules(remove_duplicate=False))
        if layer is not None:
            found = [n for n, m in names.items() if m is layer and n]
            if not found:
                raise ValueError(f"layer={type(layer).__name__} is not a submodule of {type(self.vit).__name__}; pass "
                                 "one of its modules (e.g. vit.blocks[-1]) or a layer_name")
            return found[0]
        name = VIT_PYTORCH_NAMES.get(layer_name, layer_name)
        if not hasattr(self.vit, "forward_head") and layer_name in names:
            name = layer_name  # not a vitlab model (vit-pytorch's own): hook its module as vit-pytorch does
        if name is None:
            if not hasattr(self.vit, "forward_head"):
                raise ValueError(f"layer_name={layer_name!r} needs a vitlab model with forward_head; "
                                 f"{type(self.vit).__name__} has none: name a submodule instead")
            if self.layer_save_input and not hasattr(self.vit, "forward_stem"):
                raise ValueError(f"layer_save_input=True with layer_name={layer_name!r} needs a model with "
                                 f"forward_stem (a Backbone); {type(self.vit).__name__} has none: name its first "
                                 "block instead, e.g. layer_name='blocks.0'")
            return None
        if name not in names or not name:
            top = ", ".join(repr(n) for n, _ in self.vit.named_children())
            raise ValueError(f"layer_name={layer_name!r} is not a module of {type(self.vit).__name__}; expected "
                             f"'transformer' (the tokens the head reads), {top}, or a dotted name of "
                             "named_modules() such as 'blocks.0'")
        return name

    @contextmanager
    def _catch(self, store: dict) -> Iterator[None]:
        """Store the embeddings of one forward in ``store['latents']``."""
        save_input = self.layer_save_input
        if self.module_name is None and save_input:  # the transformer's input: the stem's tokens, as a 1-tuple
            with _capture_call(self.vit, "forward_stem", store, "latents", lambda args, out: (out[0],)):
                yield
        elif self.module_name is None:  # the transformer's output: what the head consumes
            with _capture_call(self.vit, "forward_head", store, "latents", lambda args, out: args[0]):
                yield
        else:
            def hook(_module: nn.Module, inputs: tuple, output: Any) -> None:
                store["latents"] = _tensor_inputs(inputs) if save_input else output

            handle = self.vit.get_submodule(self.module_name).register_forward_hook(hook)
            try:
                yield
            finally:
                handle.remove()

    def forward(self, img: Any, return_embeddings_only: bool = False):
        """``(self.vit(img), embeddings)``, or the embeddings alone (see the class docstring)."""
        if self.ejected:
            raise ValueError("this Extractor has been ejected (eject() returned its model): wrap the model again")
        self.clear()
        store: dict = {}
        with self._catch(store):
            pred = self.vit(img)
        if "latents" not in store:
            raise ValueError(self._not_run())
        latents = store["latents"]
        if self.detach:
            latents = _map(lambda t: t.clone().detach(), latents)
        if self.device is not None:
            latents = _map(lambda t: t.to(self.device), latents)
        self.latents = tuple(latents) if isinstance(latents, list) else latents  # CrossViT: a tuple, as vit-pytorch's
        if return_embeddings_only or self.return_embeddings_only:
            return self.latents
        return pred, self.latents

    def _not_run(self) -> str:
        """The one-line error for a module the forward never called (a container whose children run one by one)."""
        what = self.module_name or "forward_head"
        kids = [f"'{self.module_name}.{n}'" for n, _ in self.vit.get_submodule(self.module_name).named_children()
                ] if self.module_name else []
        hint = f"; name one of its children that runs: {', '.join(kids)}" if kids else "; choose another layer_name"
        return f"{what!r} did not run in {type(self.vit).__name__}'s forward (the model runs its parts itself){hint}"

    def clear(self) -> None:
        """Drop the embeddings of the last call."""
        self.latents = None

    def eject(self) -> nn.Module:
        """The wrapped model (nothing of the extractor is left on it); this wrapper cannot be called again."""
        self.ejected = True
        self.clear()
        return self.vit

    def extra_repr(self) -> str:
        where = self.module_name or "forward_head input"
        return f"layer={where}, save_input={self.layer_save_input}, detach={self.detach}"
