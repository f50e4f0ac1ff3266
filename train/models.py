"""Model registry: small CIFAR-style nets for 28-32 px images, torchvision ResNets for larger ones,
and any timm architecture as ``timm:NAME``.

Every entry is ``factory(num_classes, in_channels, image_size) -> nn.Module`` returning logits
``(B, num_classes)`` for inputs ``(B, in_channels, image_size, image_size)`` float32.
"""
from __future__ import annotations

import difflib
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18, resnet50 as tv_resnet50

from dds.errors import DdsError
from dds.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")
TIMM_PREFIX = "timm:"


def register_model(name: str) -> Callable:
    """Decorator registering a model factory ``fn(num_classes, in_channels, image_size)`` under ``name``."""
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names of the registered models, sorted (``timm:NAME`` stands for every timm architecture)."""
    return MODELS.names()


def create_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build the model ``name`` with freshly initialised weights (no pretrained weights).

    Args:
        name: a registered model name (:func:`list_models`), or ``timm:NAME`` for any architecture in
            ``timm.list_models()`` (e.g. ``timm:resnet18``, ``timm:convnext_atto``).
        num_classes: size of the output layer.
        in_channels: 1 for grey, 3 for RGB.
        image_size: input side in pixels.

    Raises:
        DdsError: unknown ``name`` (the message lists the known models, or close timm names).
    """
    if name.startswith(TIMM_PREFIX):
        return timm_model(name[len(TIMM_PREFIX):], num_classes, in_channels, image_size)
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def timm_model(arch: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The timm architecture ``arch``, random init, its head and stem sized for the dataset.

    Architectures with a fixed input size (ViTs, Swin) are built for ``image_size``; the others
    (conv nets) take any size. One blank image goes through the model, so an architecture too deep
    for small images fails here, before any data is decoded.

    Raises:
        DdsError: ``arch`` is not a timm architecture, or it does not fit this input.
    """
    import timm   # only for timm: models; timm takes seconds to import
    from timm.models import get_pretrained_cfg_value

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise DdsError(f"timm has no model '{arch}'{hint}; see timm.list_models(), e.g. --model timm:resnet18")
    size = {"img_size": image_size} if get_pretrained_cfg_value(arch, "fixed_input_size") else {}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **size)
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, image_size, image_size))
    except Exception as e:  # building and probing only: whatever the architecture raises means it does not fit
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DdsError(f"timm model {arch} does not fit {in_channels}-channel {image_size}-px images ({first}); "
                       "pick another --model") from None
    return model.train()


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images (He et al. 2016, section 4.2): 3 stages of ``n`` BasicBlocks.

    Depth ``6n + 2``; widths 16/32/64; stride 2 at stages 2 and 3; global average pooling, so any
    input side >= 8 works (28x28 grey included).
    """

    def __init__(self, n: int, num_classes: int, in_channels: int, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, c_in = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                layers.append(BasicBlock(c_in, w, 2 if (i > 0 and j == 0) else 1))
                c_in = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model("resnet20")
def resnet20(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """CIFAR-style ResNet-20 (3 x 3 BasicBlocks, 16/32/64 channels, ~0.27M parameters)."""
    return CifarResNet(3, num_classes, in_channels)


@register_model("cnn3")
def cnn3(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A small 3-conv net (32/64/128 channels, BN, ReLU, 2x2 max-pools), for quick runs and tests."""
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(in_channels, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
                         *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def _torchvision_resnet(builder: Callable, num_classes: int, in_channels: int) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes)
    if in_channels != 3:  # grey (or other) inputs: a stem conv of the same shape over in_channels
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision ResNet-18 (ImageNet stem, random init); for images of 64 px and more."""
    return _torchvision_resnet(tv_resnet18, num_classes, in_channels)


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision ResNet-50 (ImageNet stem, random init); for images of 64 px and more."""
    return _torchvision_resnet(tv_resnet50, num_classes, in_channels)
