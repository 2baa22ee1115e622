"""Image classifiers built from a `ModelConfig`, looked up by name in `MODEL_BUILDERS`.

Every model maps a (N, C, H, W) batch to (N, num_classes) logits. The mlp and cnn
use out-of-place activations so that `torch.func.functional_call` under
`torch.func.vmap` can evaluate stacked copies of their parameters in one pass.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torchvision
from torch import nn

from popgrad_cli.config import ConfigError

logger = logging.getLogger(__name__)

InputShape = Tuple[int, int, int]
ModelBuilder = Callable[[Any, InputShape, int], nn.Module]

MODEL_BUILDERS: Dict[str, ModelBuilder] = {}

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}

# Images up to this side length (digits 8x8, MNIST 28x28, CIFAR and SVHN 32x32) get
# a stride-1 3x3 stem, because the ImageNet stem would cut them by 4 before the
# first residual or dense block. STL-10 (96x96) keeps the ImageNet stem.
SMALL_IMAGE_MAX_SIZE = 32


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder under `name` in MODEL_BUILDERS."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in MODEL_BUILDERS:
            raise ValueError(f"model name {name!r} is already registered; choose another name")
        MODEL_BUILDERS[name] = builder
        return builder

    return decorator


def build_model(model_cfg: Any, input_shape: InputShape, num_classes: int) -> nn.Module:
    """Build the model named by `model_cfg.name` for (C, H, W) inputs and apply `model_cfg.init`.

    Raises ConfigError for an unknown name, activation or init scheme, and
    ValueError for an input shape or class count that no model can take.
    """
    input_shape = _check_input_shape(input_shape)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"invalid num_classes: {num_classes!r}; expected an integer >= 1")

    builder = MODEL_BUILDERS.get(model_cfg.name)
    if builder is None:
        raise ConfigError(
            f"invalid value for model.name: {model_cfg.name!r}; expected one of " + ", ".join(sorted(MODEL_BUILDERS))
        )

    model = builder(model_cfg, input_shape, num_classes)
    init_weights(model, model_cfg.init)
    return model


def _check_input_shape(input_shape: Any) -> InputShape:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(size, int) and size >= 1 for size in shape):
        raise ValueError(f"invalid input_shape: {input_shape!r}; expected (C, H, W) with three integers >= 1")
    return shape  # type: ignore[return-value]


def _make_activation(name: str) -> nn.Module:
    factory = ACTIVATIONS.get(name)
    if factory is None:
        raise ConfigError(f"invalid value for model.activation: {name!r}; expected one of " + ", ".join(ACTIVATIONS))
    return factory()


# ---------------------------------------------------------------------------
# Weight initialization
# ---------------------------------------------------------------------------


def _init_xavier(module: nn.Module) -> None:
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _init_kaiming(module: nn.Module) -> None:
    # Normal with std sqrt(2 / fan_in), the usual form for ReLU networks. The ReLU
    # gain sqrt(2) is used whatever model.activation is.
    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


INIT_SCHEMES: Dict[str, Optional[Callable[[nn.Module], None]]] = {
    # Keeps what each constructor set: PyTorch's layer defaults for mlp, cnn and
    # shufflenet_v2, and torchvision's own schemes for the other torchvision models.
    "default": None,
    "xavier": _init_xavier,
    "kaiming": _init_kaiming,
}


def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialize every Conv2d and Linear weight in `model` in place by `scheme`, with zero biases.

    scheme "default" leaves the model unchanged. BatchNorm affine parameters keep
    their constructor values. Returns `model`.
    """
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"invalid value for model.init: {scheme!r}; expected one of " + ", ".join(INIT_SCHEMES))
    initialize = INIT_SCHEMES[scheme]
    if initialize is None:
        return model

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            initialize(module)
    return model


# ---------------------------------------------------------------------------
# mlp and cnn
# ---------------------------------------------------------------------------


@register_model("mlp")
def build_mlp(model_cfg: Any, input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """Build Flatten, `depth` blocks of Linear -> [BatchNorm1d] -> activation -> [Dropout], and a Linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    in_features = math.prod(input_shape)
    for _ in range(model_cfg.depth):
        block: list[nn.Module] = [
            # BatchNorm subtracts the mean, so a bias before it would only add
            # parameters (and PG noise) with no effect on the output.
            nn.Linear(in_features, model_cfg.width, bias=not model_cfg.batch_norm)
        ]
        if model_cfg.batch_norm:
            block.append(nn.BatchNorm1d(model_cfg.width))
        block.append(_make_activation(model_cfg.activation))
        if model_cfg.dropout > 0:
            block.append(nn.Dropout(model_cfg.dropout))
        layers.append(nn.Sequential(*block))
        in_features = model_cfg.width

    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


@register_model("cnn")
def build_cnn(model_cfg: Any, input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """Build `depth` conv blocks, global average pooling, optional Dropout and a Linear classifier.

    Block i is conv3x3 with `width * 2**i` channels -> [BatchNorm2d] -> activation ->
    2x2 max pool, where the pool is left out once it would shrink the feature map
    below 2x2. Which blocks pool is fixed here from `input_shape`.
    """
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for index in range(model_cfg.depth):
        out_channels = model_cfg.width * 2**index
        layers.append(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not model_cfg.batch_norm)
        )
        if model_cfg.batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(_make_activation(model_cfg.activation))
        if min(height, width) >= 4:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        in_channels = out_channels

    layers.extend([nn.AdaptiveAvgPool2d(1), nn.Flatten()])
    # Dropout acts on the pooled features, not on the conv maps. Neighboring pixels
    # of a map are strongly correlated, so dropping single pixels regularizes little.
    # Dropping pooled channels before the classifier matches mobilenet_v2's head.
    if model_cfg.dropout > 0:
        layers.append(nn.Dropout(model_cfg.dropout))
    layers.append(nn.Linear(in_channels, num_classes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------
# torchvision models
# ---------------------------------------------------------------------------


def _is_small_image(input_shape: InputShape) -> bool:
    return max(input_shape[1], input_shape[2]) <= SMALL_IMAGE_MAX_SIZE


def _adapt_stem_conv(
    conv: nn.Conv2d,
    input_shape: InputShape,
    init_weight: Optional[Callable[[torch.Tensor], Any]],
) -> nn.Conv2d:
    """Return a first conv that takes C channels, and is 3x3 stride 1 for small images.

    `init_weight` repeats the constructor's scheme on a new conv, so that
    init=default gives what torchvision gives, and None keeps PyTorch's default.
    """
    in_channels = input_shape[0]
    if _is_small_image(input_shape):
        kernel_size, stride, padding = 3, 1, 1
    elif in_channels != conv.in_channels:
        kernel_size, stride, padding = conv.kernel_size, conv.stride, conv.padding
    else:
        return conv

    new_conv = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        bias=conv.bias is not None,
    )
    if init_weight is not None:
        init_weight(new_conv.weight)
    return new_conv


def _warn_unused_dropout(model_cfg: Any) -> None:
    if model_cfg.dropout > 0:
        logger.warning(
            "model.dropout=%s is ignored: %s has no classifier dropout; set model.dropout=0 to silence this",
            model_cfg.dropout,
            model_cfg.name,
        )


def _kaiming_fan_out(weight: torch.Tensor) -> None:
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


def _adapt_resnet(model: torchvision.models.ResNet, input_shape: InputShape) -> torchvision.models.ResNet:
    # torchvision.models.ResNet initializes convs with kaiming_normal_(fan_out, relu).
    model.conv1 = _adapt_stem_conv(model.conv1, input_shape, _kaiming_fan_out)
    if _is_small_image(input_shape):
        model.maxpool = nn.Identity()
    return model


@register_model("resnet18")
def build_resnet18(model_cfg: Any, input_shape: InputShape, num_classes: int) -> nn.Module:
    """Build torchvision resnet18 with random weights and a stem adapted to `input_shape`."""
    _warn_unused_dropout(model_cfg)
    return _adapt_resnet(torchvision.models.resnet18(weights=None, num_classes=num_classes), input_shape)


@register_model("resnet50")
def build_resnet50(model_cfg: Any, input_shape: InputShape, num_classes: int) -> nn.Module:
    """Build torchvision resnet50 with random weights and a stem adapted to `input_shape`."""
    _warn_unused_dropout(model_cfg)
    return _adapt_resnet(torchvision.models.resnet50(weights=None, num_classes=num_classes), input_shape)


@register_model("densenet161")
def build_densenet161(model_cfg: Any, input_shape: InputShape, num_classes: int) -> nn.Module:
    """Build torchvision densenet161 with random weights and a stem adapted to `input_shape`.

    model.dropout is not mapped to densenet's `drop_rate`, which drops features
    inside every dense layer rather than before the classifier.
    """
    _warn_unused_dropout(model_cfg)
    model = torchvision.models.densenet161(weights=None, num_classes=num_classes)
    features = model.features
    # torchvision.models.DenseNet initializes convs with kaiming_normal_ (fan_in).
    features.conv0 = _adapt_stem_conv(features.conv0, input_shape, nn.init.kaiming_normal_)
    if _is_small_image(input_shape):
        features.pool0 = nn.Identity()
    return model


@register_model("mobilenet_v2")
def build_mobilenet_v2(model_cfg: Any, input_shape: InputShape, num_classes: int) -> nn.Module:
    """Build torchvision mobilenet_v2 with random weights, classifier dropout `model.dropout` and an adapted stem.

    mobilenet_v2 has no max pool, so a small image only gets a stride-1 first conv.
    """
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, dropout=model_cfg.dropout)
    stem = model.features[0]
    # torchvision.models.MobileNetV2 initializes convs with kaiming_normal_(fan_out).
    stem[0] = _adapt_stem_conv(stem[0], input_shape, _kaiming_fan_out)
    return model


@register_model("shufflenet_v2")
def build_shufflenet_v2(model_cfg: Any, input_shape: InputShape, num_classes: int) -> nn.Module:
    """Build torchvision shufflenet_v2_x1_0 with random weights and a stem adapted to `input_shape`."""
    _warn_unused_dropout(model_cfg)
    model = torchvision.models.shufflenet_v2_x1_0(weights=None, num_classes=num_classes)
    # torchvision.models.ShuffleNetV2 keeps PyTorch's default conv init, hence None.
    model.conv1[0] = _adapt_stem_conv(model.conv1[0], input_shape, None)
    if _is_small_image(input_shape):
        model.maxpool = nn.Identity()
    return model
