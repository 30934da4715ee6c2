"""Loading the CLIP model the service uses, and running it on preprocessed batches.

:func:`load_model` builds open_clip's model exactly as the service does (fp32, eval
mode) and wraps it in a :class:`LoadedModel`: its cache identity, its embedding size,
whether its weights are a random test checkpoint, and ``encode`` / ``encode_uint8``,
which turn image batches into L2-normalised float32 vectors. With ``lazy=True`` the
weights load on first use, so a run whose images are all cached never loads them.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from inspection_refresh.clip.preprocess import describe_preprocessing, normalize_uint8

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

# The name these lines had before the model code left clip/embed.py: log filters keep working.
log = logging.getLogger("inspection_refresh.clip.embed")

_LOAD_LOCK = threading.Lock()


class CLIPWeightsError(RuntimeError):
    """The CLIP model or its weights could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """An open_clip model ready to embed images, and what it is.

    ``identity`` is :func:`inspection_refresh.clip.weights.model_identity` (the
    cache key); ``random_init`` is True for checkpoints made by
    :func:`~inspection_refresh.clip.weights.create_random_checkpoint`, whose
    embeddings mean nothing. ``model`` is the open_clip module in eval mode; with
    ``load_model(..., lazy=True)`` it is built on first use, so a run whose
    images are all cached never loads the weights.
    """

    model_name: str
    pretrained: str
    device: str
    identity: str
    embed_dim: int
    random_init: bool
    _model: Any = field(default=None, repr=False)
    _loader: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def model(self) -> Any:
        if self._model is None:
            with _LOAD_LOCK:
                if self._model is None:
                    if self._loader is None:
                        raise CLIPWeightsError(f"no model and no way to load {self.model_name} {self.pretrained!r}")
                    self._model = self._loader()
        return self._model

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory yet."""
        return self._model is not None

    def encode_uint8(self, batch: "torch.Tensor") -> "np.ndarray":
        """uint8 ``[B, 3, 224, 224]`` -> float32 unit vectors ``[B, D]``.

        The batch is :func:`~inspection_refresh.clip.preprocess.load_resized`'s tensors, stacked.
        Normalises on the model's device; safe to call from several threads at once.
        """
        return self.encode(normalize_uint8(batch.to(self.device, non_blocking=True)))

    def encode(self, batch: "torch.Tensor") -> "np.ndarray":
        """Normalised image batch ``[B, 3, 224, 224]`` -> float32 unit vectors ``[B, D]``."""
        import torch

        model = self.model
        with torch.inference_mode():
            feats = model.encode_image(batch.to(self.device, non_blocking=True))
            feats = feats.float()
            feats = feats / feats.norm(dim=-1, keepdim=True)
            return feats.cpu().numpy().astype("float32", copy=False)


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is usable, else ``"cpu"``; others are checked."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIPWeightsError(f"device {device!r} was asked for but torch sees no CUDA GPU; use 'cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'")
    return device


def _create_model(model_name: str, pretrained: str, device: str) -> Any:
    """``open_clip.create_model_and_transforms`` as the service calls it, in eval mode, or a clear error."""
    import open_clip
    import torch

    try:
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except Exception as exc:
        if os.path.isfile(str(pretrained)):
            hint = (
                f"the checkpoint file {pretrained} exists but did not load into {model_name}: "
                "check that it was saved for this model (state_dict keys and shapes)"
            )
        else:
            hint = (
                f"weights tag {pretrained!r} for {model_name} must come from the Hugging Face hub cache "
                "(HF_HOME / HF_HUB_CACHE) or be downloaded; on an offline machine, fetch them once where "
                f"there is internet (open_clip.create_model({model_name!r}, pretrained={pretrained!r})) and copy "
                "the cache over, or save the weights to a file and set INSPECTION_CLIP_PRETRAINED to its path"
            )
        raise CLIPWeightsError(f"could not load CLIP {model_name} weights {pretrained!r}: {exc}; {hint}") from exc
    model.eval()
    if device.startswith("cuda"):
        # keep fp32 semantics on the GPU (cuDNN would use TF32 for the patch-embedding conv)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    log.info("loaded CLIP %s weights %s on %s", model_name, pretrained, device)
    # open_clip has just logged the transform it builds (bicubic, resize_mode "shortest", centre crop);
    # that transform is discarded, and a reader of the log must not take it for what the gallery gets.
    log.info("CLIP preprocessing used (the service's, not open_clip's transform above): %s", describe_preprocessing())
    return model


def load_model(
    model_name: str = "ViT-B-32", pretrained: str = "openai", device: str = "auto", *, lazy: bool = False
) -> LoadedModel:
    """Load open_clip ``model_name`` with weights ``pretrained`` (tag or checkpoint path), in eval mode.

    The model is built exactly as the service builds it,
    ``open_clip.create_model_and_transforms(model_name, pretrained=pretrained)``,
    in fp32. ``device`` is ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``. With
    ``lazy=True`` only the identity is worked out now and the weights are
    loaded on first use (an all-cached run then costs no model load).

    Raises :class:`CLIPWeightsError` naming the tag or file and what to do when
    the weights cannot be had (this machine may be offline).
    """
    import open_clip

    from inspection_refresh.clip.weights import is_random_checkpoint, model_identity

    dev = resolve_device(device)
    try:
        identity = model_identity(model_name, pretrained)
    except ValueError as exc:
        raise CLIPWeightsError(
            f"cannot use CLIP weights {pretrained!r} for {model_name}: {exc}. "
            "Set the DAG param / INSPECTION_CLIP_PRETRAINED to an open_clip tag (e.g. 'openai') "
            "or to an existing checkpoint file."
        ) from exc
    config = open_clip.get_model_config(model_name)
    random_init = is_random_checkpoint(pretrained)
    if random_init:
        log.warning("CLIP %s weights %s are RANDOM (test/demo checkpoint): embeddings carry no meaning", model_name, pretrained)
    loaded = LoadedModel(
        model_name=model_name,
        pretrained=str(pretrained),
        device=dev,
        identity=identity,
        embed_dim=int(config["embed_dim"]) if config else 0,
        random_init=random_init,
        _loader=lambda: _create_model(model_name, str(pretrained), dev),
    )
    if not lazy or not config:
        loaded._model = loaded._loader()  # type: ignore[misc]
        loaded.embed_dim = int(loaded._model.visual.output_dim)
    return loaded
