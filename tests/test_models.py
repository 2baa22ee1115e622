import copy
import logging
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from popgrad_cli.config import MODEL_NAMES, ConfigError, ModelConfig, register_configs
from popgrad_cli.models import MODEL_BUILDERS, build_model, init_weights

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
INPUT_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 96, 96)]


def make_cfg(name: str, **overrides) -> ModelConfig:
    return ModelConfig(name=name, **overrides)


def logits(model: nn.Module, input_shape, batch_size: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch_size, *input_shape))


def modules_of(model: nn.Module, kind: type) -> list:
    return [module for module in model.modules() if isinstance(module, kind)]


# ---------------------------------------------------------------------------
# Registry and shapes
# ---------------------------------------------------------------------------


def test_registry_matches_config_names():
    assert sorted(MODEL_BUILDERS) == sorted(MODEL_NAMES)


@pytest.mark.parametrize("input_shape", INPUT_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape(name, input_shape):
    torch.manual_seed(0)
    model = build_model(make_cfg(name), input_shape, num_classes=10)

    output = logits(model, input_shape)

    assert output.shape == (2, 10)
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("name", ["mlp", "cnn", "mobilenet_v2"])
def test_forward_shape_100_classes(name):
    model = build_model(make_cfg(name), (3, 32, 32), num_classes=100)

    assert logits(model, (3, 32, 32)).shape == (2, 100)


# ---------------------------------------------------------------------------
# torchvision stems
# ---------------------------------------------------------------------------

STEMS = {
    "resnet18": (lambda m: m.conv1, lambda m: m.maxpool),
    "resnet50": (lambda m: m.conv1, lambda m: m.maxpool),
    "densenet161": (lambda m: m.features.conv0, lambda m: m.features.pool0),
    "mobilenet_v2": (lambda m: m.features[0][0], None),
    "shufflenet_v2": (lambda m: m.conv1[0], lambda m: m.maxpool),
}


@pytest.mark.parametrize("name", sorted(STEMS))
def test_small_image_stem(name):
    get_conv, get_pool = STEMS[name]
    model = build_model(make_cfg(name), (1, 28, 28), num_classes=10)
    conv = get_conv(model)

    assert conv.in_channels == 1
    assert conv.kernel_size == (3, 3)
    assert conv.stride == (1, 1)
    if get_pool is not None:
        assert isinstance(get_pool(model), nn.Identity)


@pytest.mark.parametrize("name", sorted(STEMS))
def test_large_image_stem(name):
    get_conv, get_pool = STEMS[name]
    model = build_model(make_cfg(name), (1, 96, 96), num_classes=10)
    conv = get_conv(model)

    assert conv.in_channels == 1
    assert conv.stride == (2, 2)
    if get_pool is not None:
        assert isinstance(get_pool(model), nn.MaxPool2d)


def test_stem_default_init_follows_torchvision():
    # torchvision's ResNet draws convs from kaiming_normal_(fan_out, relu); the
    # replaced stem conv must too, so init=default is what torchvision builds.
    torch.manual_seed(0)
    conv = build_model(make_cfg("resnet18"), (3, 32, 32), num_classes=10).conv1
    fan_out = conv.out_channels * 3 * 3

    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.15)


def test_mobilenet_dropout_from_config():
    model = build_model(make_cfg("mobilenet_v2", dropout=0.35), (3, 32, 32), num_classes=10)

    assert model.classifier[0].p == 0.35


def test_unused_dropout_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="popgrad_cli.models"):
        build_model(make_cfg("resnet18", dropout=0.5), (3, 32, 32), num_classes=10)

    assert "model.dropout=0.5 is ignored" in caplog.text


# ---------------------------------------------------------------------------
# mlp and cnn switches
# ---------------------------------------------------------------------------


def test_mlp_linear_shapes():
    model = build_model(make_cfg("mlp", depth=3, width=16), (1, 8, 8), num_classes=10)
    shapes = [tuple(layer.weight.shape) for layer in modules_of(model, nn.Linear)]

    assert shapes == [(16, 64), (16, 16), (16, 16), (10, 16)]


def test_mlp_defaults_have_no_extras():
    model = build_model(make_cfg("mlp"), (1, 8, 8), num_classes=10)

    assert modules_of(model, nn.BatchNorm1d) == []
    assert modules_of(model, nn.Dropout) == []


def test_mlp_batch_norm():
    model = build_model(make_cfg("mlp", depth=3, width=16, batch_norm=True), (1, 8, 8), num_classes=10)
    hidden = modules_of(model, nn.Linear)[:-1]

    assert len(modules_of(model, nn.BatchNorm1d)) == 3
    assert all(layer.bias is None for layer in hidden)


def test_mlp_dropout():
    model = build_model(make_cfg("mlp", depth=3, width=16, dropout=0.25), (1, 8, 8), num_classes=10)
    dropouts = modules_of(model, nn.Dropout)

    assert len(dropouts) == 3
    assert all(layer.p == 0.25 for layer in dropouts)


@pytest.mark.parametrize("activation, kind", [("relu", nn.ReLU), ("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh)])
def test_mlp_activation(activation, kind):
    model = build_model(make_cfg("mlp", depth=2, width=16, activation=activation), (1, 8, 8), num_classes=10)

    assert len(modules_of(model, kind)) == 2


def test_relu_not_inplace():
    for name in ("mlp", "cnn"):
        model = build_model(make_cfg(name, width=8), (1, 8, 8), num_classes=10)
        assert not any(relu.inplace for relu in modules_of(model, nn.ReLU)), name


def test_cnn_channels():
    model = build_model(make_cfg("cnn", depth=3, width=8), (3, 32, 32), num_classes=10)
    channels = [conv.out_channels for conv in modules_of(model, nn.Conv2d)]

    assert channels == [8, 16, 32]
    assert modules_of(model, nn.Linear)[0].in_features == 32


@pytest.mark.parametrize("input_shape, pools", [((1, 8, 8), 2), ((1, 28, 28), 3), ((3, 32, 32), 4)])
def test_cnn_pooling_stops_at_2x2(input_shape, pools):
    model = build_model(make_cfg("cnn", depth=4, width=4), input_shape, num_classes=10)

    assert len(modules_of(model, nn.MaxPool2d)) == pools
    assert logits(model, input_shape).shape == (2, 10)


def test_cnn_batch_norm_and_dropout():
    model = build_model(make_cfg("cnn", depth=2, width=8, batch_norm=True, dropout=0.3), (3, 32, 32), num_classes=10)
    layers = list(model)

    assert len(modules_of(model, nn.BatchNorm2d)) == 2
    assert all(conv.bias is None for conv in modules_of(model, nn.Conv2d))
    assert isinstance(layers[-2], nn.Dropout)
    assert layers[-2].p == 0.3


# ---------------------------------------------------------------------------
# Initialization
# ---------------------------------------------------------------------------


def test_xavier_std_and_bias():
    torch.manual_seed(0)
    model = build_model(make_cfg("mlp", width=512, init="xavier"), (3, 32, 32), num_classes=10)
    first = modules_of(model, nn.Linear)[0]

    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / (3072 + 512)), rel=0.02)
    assert first.weight.abs().max().item() <= math.sqrt(6 / (3072 + 512))
    assert all(torch.all(layer.bias == 0) for layer in modules_of(model, nn.Linear))


def test_kaiming_std_and_bias():
    torch.manual_seed(0)
    model = build_model(make_cfg("mlp", width=512, init="kaiming"), (3, 32, 32), num_classes=10)
    first = modules_of(model, nn.Linear)[0]

    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / 3072), rel=0.02)
    assert all(torch.all(layer.bias == 0) for layer in modules_of(model, nn.Linear))


def test_default_init_is_pytorch():
    # PyTorch's Linear draws weights from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in).
    torch.manual_seed(0)
    model = build_model(make_cfg("mlp", width=512), (3, 32, 32), num_classes=10)
    first = modules_of(model, nn.Linear)[0]

    assert first.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 3072), rel=0.02)
    assert first.bias.abs().max().item() > 0


def test_init_reaches_torchvision_convs():
    torch.manual_seed(0)
    model = build_model(make_cfg("resnet18", init="xavier"), (3, 32, 32), num_classes=10)
    conv = model.layer4[1].conv2  # 512 -> 512 channels, 3x3
    fan = 512 * 9

    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (fan + fan)), rel=0.02)
    assert torch.all(model.fc.bias == 0)


def test_init_weights_depthwise_conv_fan_in():
    # A depthwise conv has one input channel per group, so its fan_in is 3 * 3.
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, kernel_size=3, groups=256)
    init_weights(conv, "kaiming")

    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.05)


# ---------------------------------------------------------------------------
# Invalid arguments
# ---------------------------------------------------------------------------


def test_unknown_name_rejected():
    with pytest.raises(ConfigError, match="'vgg16'"):
        build_model(make_cfg("vgg16"), (3, 32, 32), num_classes=10)


def test_unknown_activation_rejected():
    with pytest.raises(ConfigError, match="model.activation: 'gelu'"):
        build_model(make_cfg("mlp", activation="gelu"), (1, 8, 8), num_classes=10)


def test_unknown_init_rejected():
    with pytest.raises(ConfigError, match="model.init: 'orthogonal'"):
        build_model(make_cfg("mlp", init="orthogonal"), (1, 8, 8), num_classes=10)


@pytest.mark.parametrize("input_shape", [(8, 8), (1, 0, 8), (1, 8.0, 8)])
def test_bad_input_shape_rejected(input_shape):
    with pytest.raises(ValueError, match="input_shape"):
        build_model(make_cfg("mlp"), input_shape, num_classes=10)


def test_bad_num_classes_rejected():
    with pytest.raises(ValueError, match="num_classes: 0"):
        build_model(make_cfg("mlp"), (1, 8, 8), num_classes=0)


# ---------------------------------------------------------------------------
# functional_call under vmap
# ---------------------------------------------------------------------------


def stacked_copies(model: nn.Module, count: int) -> list:
    copies = []
    for seed in range(count):
        member = copy.deepcopy(model)
        torch.manual_seed(seed)
        init_weights(member, "xavier")
        copies.append(member)
    return copies


@pytest.mark.parametrize("name, input_shape", [("mlp", (1, 8, 8)), ("cnn", (3, 32, 32))])
def test_vmap_matches_separate_calls(name, input_shape):
    base = build_model(make_cfg(name, width=16, dropout=0.2), input_shape, num_classes=10).eval()
    members = [member.eval() for member in stacked_copies(base, 3)]
    params, buffers = stack_module_state(members)
    inputs = torch.randn(4, *input_shape)

    def forward(member_params, member_buffers, x):
        return functional_call(base, (member_params, member_buffers), (x,))

    with torch.no_grad():
        batched = vmap(forward, in_dims=(0, 0, None), randomness="different")(params, buffers, inputs)
        separate = torch.stack([member(inputs) for member in members])

    assert batched.shape == (3, 4, 10)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)


def test_vmap_dropout_differs_per_member():
    base = build_model(make_cfg("mlp", width=64, dropout=0.5), (1, 8, 8), num_classes=10).train()
    params, buffers = stack_module_state([copy.deepcopy(base) for _ in range(2)])
    inputs = torch.randn(4, 1, 8, 8)

    def forward(member_params, member_buffers, x):
        return functional_call(base, (member_params, member_buffers), (x,))

    with torch.no_grad():
        outputs = vmap(forward, in_dims=(0, 0, None), randomness="different")(params, buffers, inputs)

    assert not torch.allclose(outputs[0], outputs[1])


# ---------------------------------------------------------------------------
# Hydra configs
# ---------------------------------------------------------------------------


def test_yaml_files_match_names():
    assert sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml")) == sorted(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_yaml_composes_and_builds(name):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(overrides=[f"+model={name}"])

    assert OmegaConf.get_type(cfg.model) is ModelConfig
    assert cfg.model.name == name
    assert logits(build_model(cfg.model, (1, 8, 8), num_classes=10), (1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_yaml_keys_commented(name):
    lines = (CONF_DIR / "model" / f"{name}.yaml").read_text().splitlines()
    entries = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    uncommented = [line for line in entries if line.strip() != "defaults:" and " # " not in line]

    assert uncommented == []
