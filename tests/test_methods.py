"""Comparator methods: SAM, SWA, weight noise and PG with SWA, checked against their definitions."""

import copy
import io
import json
import math

import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call

import popgrad_cli.methods
import popgrad_cli.train
from popgrad_cli.cli import conf_dir, main, register_resolvers
from popgrad_cli.config import ConfigError, MethodConfig, register_configs, resolve_swa_start, validate_config
from popgrad_cli.data import BatchTransform, load_splits
from popgrad_cli.errors import EXIT_INTERRUPTED, EXIT_INVALID_CONFIG
from popgrad_cli.methods import NormalisedBatches, SharpnessAwareGradient, WeightAveraging
from popgrad_cli.population import PlainGradient, PopulationGradient, build_estimator, cross_entropy
from popgrad_cli.train import SignalGuard, Trainer, seed_everything

# digits: 1438 training images, 10% held out for validation.
DIGITS_TRAIN_SIZE = 1438 - 144


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run torch on one thread: the models here are too small to gain from more, and extra threads contend for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def method_configs():
    """Return the composed default config of each method, composed once for the module."""
    register_configs()
    register_resolvers()
    names = ("pg", "sam", "swa", "pg_swa", "weight_noise")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return {name: compose(config_name="config", overrides=[f"method={name}"]) for name in names}


def config_with(method_configs, overrides):
    """Return a copy of ``method=NAME``'s config with the ``key=value`` overrides, each value parsed as YAML."""
    method = overrides[0].split("=")[1]
    cfg = copy.deepcopy(method_configs[method])
    for override in overrides[1:]:
        key, value = override.split("=")
        OmegaConf.update(cfg, key, yaml.safe_load(value))
    return cfg


def method_config(name, **overrides):
    method = OmegaConf.structured(MethodConfig(name=name))
    for key, value in overrides.items():
        method[key] = value
    return method


def tiny_model(batch_norm=False):
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(5, 4)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(4))
    layers += [nn.Tanh(), nn.Linear(4, 3)]
    return nn.Sequential(*layers)


def tiny_batch(size=8):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 5, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def weights(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def gradient_at(model, point, inputs, targets):
    """Return the mini-batch loss gradient at the weights ``point``, leaving the model alone."""
    leaves = {name: value.clone().requires_grad_() for name, value in point.items()}
    loss = cross_entropy(functional_call(model, leaves, (inputs,)), targets)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def sam_reference_step(model, inputs, targets, rho, adaptive, lr):
    """Return the weights after one SGD step (no momentum) with the SAM gradient, from its formula."""
    theta = weights(model)
    g = gradient_at(model, theta, inputs, targets)
    if adaptive:
        scaled = {name: theta[name].abs() * g[name] for name in g}
        norm = math.sqrt(sum(float(value.pow(2).sum()) for value in scaled.values()))
        offset = {name: rho * theta[name].abs() ** 2 * g[name] / norm for name in g}
    else:
        norm = math.sqrt(sum(float(value.pow(2).sum()) for value in g.values()))
        offset = {name: rho * g[name] / norm for name in g}
    perturbed = {name: theta[name] + offset[name] for name in theta}
    g_perturbed = gradient_at(model, perturbed, inputs, targets)
    return {name: theta[name] - lr * g_perturbed[name] for name in theta}


# SAM


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_step_matches_formula(adaptive):
    model = tiny_model()
    inputs, targets = tiny_batch()
    expected = sam_reference_step(model, inputs, targets, rho=0.5, adaptive=adaptive, lr=0.1)
    theta = weights(model)
    plain_step = theta["1.weight"] - 0.1 * gradient_at(model, theta, inputs, targets)["1.weight"]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    estimator = SharpnessAwareGradient(model, method_config("sam", rho=0.5, adaptive=adaptive))
    optimizer.zero_grad(set_to_none=True)
    estimator.backward(inputs, targets, step=0)
    optimizer.step()

    actual = weights(model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)
    assert not torch.allclose(actual["1.weight"], plain_step), "the SAM step equals a plain step"


def test_sam_restores_weights():
    model = tiny_model()
    before = weights(model)
    SharpnessAwareGradient(model, method_config("sam", rho=0.5)).backward(*tiny_batch(), step=0)
    after = weights(model)
    for name in before:
        assert torch.equal(after[name], before[name]), name


def test_sam_returns_unperturbed_loss():
    model = tiny_model()
    inputs, targets = tiny_batch()
    expected = cross_entropy(model(inputs), targets).detach()
    loss = SharpnessAwareGradient(model, method_config("sam", rho=0.5)).backward(inputs, targets, step=0)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_sam_updates_batch_norm_once(momentum):
    sam_model = tiny_model(batch_norm=True)
    sam_model[2].momentum = momentum
    reference = copy.deepcopy(sam_model)
    inputs, targets = tiny_batch()

    SharpnessAwareGradient(sam_model, method_config("sam", rho=0.5)).backward(inputs, targets, step=0)
    reference(inputs)

    for (name, actual), expected in zip(sam_model.named_buffers(), reference.buffers()):
        assert torch.equal(actual, expected), name


def test_sam_zero_gradient_gives_zero_offset():
    model = tiny_model()
    estimator = SharpnessAwareGradient(model, method_config("sam"))
    params = list(model.parameters())
    offsets = estimator.ascent_offsets(params, [torch.zeros_like(param) for param in params])
    for offset in offsets:
        assert torch.count_nonzero(offset) == 0


def test_sam_counts_two_passes():
    estimator = SharpnessAwareGradient(tiny_model(), method_config("sam"))
    assert estimator.gradient_evaluations(32) == 64


def test_build_estimator_picks_sam():
    estimator = build_estimator(tiny_model(), method_config("sam"), total_steps=10)
    assert isinstance(estimator, SharpnessAwareGradient)


# Weight noise


def test_weight_noise_is_pg_with_one_member(method_configs):
    method = method_configs["weight_noise"].method
    estimator = build_estimator(tiny_model(), method, total_steps=10)
    assert isinstance(estimator, PopulationGradient)
    assert estimator.population_size == 1


def test_weight_noise_sigma_zero_is_baseline(method_configs):
    method = config_with(method_configs, ["method=weight_noise", "method.sigma=0"]).method
    model = tiny_model()
    inputs, targets = tiny_batch()
    PlainGradient(model).backward(inputs, targets, step=0)
    plain = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    build_estimator(model, method, total_steps=10).backward(inputs, targets, step=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], msg=name)


def test_weight_noise_equals_pg_one_member(method_configs):
    pg = copy.deepcopy(method_configs["pg"].method)
    pg.population_size = 1
    gradients = []
    for method in (method_configs["weight_noise"].method, pg):
        model = tiny_model()
        torch.manual_seed(5)
        build_estimator(model, method, total_steps=10).backward(*tiny_batch(), step=0)
        gradients.append([param.grad for param in model.parameters()])
    for weight_noise_grad, pg_grad in zip(*gradients):
        assert torch.equal(weight_noise_grad, pg_grad)


def test_weight_noise_perturbs_gradient():
    method = method_config("weight_noise", population_size=1, sigma=0.5)
    model = tiny_model()
    inputs, targets = tiny_batch()
    PlainGradient(model).backward(inputs, targets, step=0)
    plain = model[1].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    build_estimator(model, method, total_steps=10).backward(inputs, targets, step=0)
    assert not torch.allclose(model[1].weight.grad, plain)


# Stochastic Weight Averaging, unit level


@pytest.mark.parametrize("swa_start,expected", [(1, 1), (3.0, 3), (0.75, 8), (0.5, 6), (0.05, 1), (0.99, 10)])
def test_swa_start_resolution(swa_start, expected):
    assert resolve_swa_start(swa_start, epochs=10) == expected


def epoch_learning_rates(schedule, epochs, **method_options):
    """Return the learning rate of each epoch with the given SWA options around ``schedule``."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    batches = NormalisedBatches(torch.zeros(4, 1, 1, 5, dtype=torch.uint8), BatchTransform([0.5], [0.5]), 4)
    averaging = WeightAveraging(model, optimizer, method_config("swa", **method_options), epochs, batches)
    rates = []
    for epoch in range(1, epochs + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        averaging.end_epoch(epoch)
        averaging.step_schedule(scheduler, next_epoch=epoch + 1)
    return rates


def test_swa_lr_replaces_schedule():
    rates = epoch_learning_rates("step", 5, swa_start=3, swa_lr=0.01)
    assert rates[:2] == pytest.approx([0.1, 0.05])
    assert rates[2:] == pytest.approx([0.01, 0.01, 0.01])


def test_swa_lr_anneals():
    rates = epoch_learning_rates("step", 5, swa_start=3, swa_lr=0.01, swa_anneal_epochs=2, swa_anneal_strategy="linear")
    # Epoch 2 ran at 0.05; SWALR goes halfway to 0.01 in epoch 3 and reaches it in epoch 4.
    assert rates == pytest.approx([0.1, 0.05, 0.03, 0.01, 0.01])


def test_swa_lr_from_first_epoch():
    rates = epoch_learning_rates("step", 3, swa_start=1, swa_lr=0.01)
    assert rates == pytest.approx([0.01, 0.01, 0.01])


def test_swa_lr_null_keeps_schedule():
    rates = epoch_learning_rates("cosine", 4, swa_start=2, swa_lr=None)
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * epoch / 4)) for epoch in range(4)]
    assert rates == pytest.approx(expected)


def test_normalised_batches_cover_training_split():
    images = torch.randint(0, 256, (10, 3, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    transform = BatchTransform([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    batches = list(NormalisedBatches(images, transform, batch_size=4, channels_last=True))
    assert [len(batch) for batch in batches] == [4, 4, 2]
    torch.testing.assert_close(torch.cat(batches), transform(images, train=False))
    assert batches[0].is_contiguous(memory_format=torch.channels_last)


def bn_averaging(images):
    model = tiny_model(batch_norm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    transform = BatchTransform([0.5], [0.5])
    batches = NormalisedBatches(images, transform, batch_size=4)
    averaging = WeightAveraging(model, optimizer, method_config("swa", swa_start=1), 2, batches)
    return model, averaging, transform


def test_swa_batch_norm_matches_training_data():
    images = torch.randint(0, 256, (8, 1, 1, 5), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    model, averaging, transform = bn_averaging(images)
    evaluated = averaging.end_epoch(1)

    # Two equal batches: update_bn's cumulative average is the mean of the two batch statistics.
    hidden = averaging.averaged.module[1](transform(images, train=False).flatten(1)).detach()
    expected_mean = hidden.mean(0)
    expected_var = (hidden[:4].var(0, unbiased=True) + hidden[4:].var(0, unbiased=True)) / 2
    assert evaluated is averaging.averaged.module
    torch.testing.assert_close(evaluated[2].running_mean, expected_mean)
    torch.testing.assert_close(evaluated[2].running_var, expected_var)
    assert torch.count_nonzero(model[2].running_mean) == 0, "the live model's statistics changed"


def test_swa_refresh_once_per_average(monkeypatch):
    calls = []
    original = popgrad_cli.methods.update_bn
    monkeypatch.setattr(popgrad_cli.methods, "update_bn", lambda *args: calls.append(1) or original(*args))
    _, averaging, _ = bn_averaging(torch.zeros(8, 1, 1, 5, dtype=torch.uint8))
    averaging.end_epoch(1)
    averaging.model_for_evaluation()
    assert len(calls) == 1
    averaging.end_epoch(2)
    assert len(calls) == 2


def test_swa_evaluates_live_model_before_start():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = NormalisedBatches(torch.zeros(4, 1, 1, 5, dtype=torch.uint8), BatchTransform([0.5], [0.5]), 4)
    averaging = WeightAveraging(model, optimizer, method_config("swa", swa_start=2), 3, batches)
    assert averaging.end_epoch(1) is model
    assert averaging.n_averaged == 0


def test_swa_state_round_trip():
    model, averaging, _ = bn_averaging(torch.zeros(8, 1, 1, 5, dtype=torch.uint8))
    averaging.end_epoch(1)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    averaging.end_epoch(2)
    buffer = io.BytesIO()
    torch.save(averaging.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    _, restored, _ = bn_averaging(torch.zeros(8, 1, 1, 5, dtype=torch.uint8))
    restored.load_state_dict(state)
    assert restored.n_averaged == 2
    assert restored.refreshed_at == 2
    for (name, actual), expected in zip(restored.averaged.state_dict().items(), averaging.averaged.state_dict().values()):
        assert torch.equal(actual, expected), name


# Trainer level


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def make_trainer(compose_config, data_root, run_dir, *overrides):
    cfg = compose_config(f"data.root={data_root}", "device=cpu", "trainer.progress=false", *overrides)
    validate_config(cfg)
    seed_everything(cfg.seed)
    splits = load_splits(cfg.dataset, cfg.data, cfg.seed, "cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir, torch.device("cpu"), splits)


def test_swa_average_is_epoch_mean(compose_config, data_root, tmp_path):
    trainer = make_trainer(
        compose_config, data_root, tmp_path, "method=swa", "trainer.epochs=4", "method.swa_start=2", "dataset.train_size=200"
    )
    guard = SignalGuard()
    snapshots = []
    for epoch in range(1, 5):
        trainer._train_epoch(guard)
        if epoch >= 2:
            snapshots.append(weights(trainer.model))
        trainer._end_epoch()

    averaging = trainer.weight_averaging
    assert averaging.n_averaged == 3
    for name, param in averaging.averaged.module.named_parameters():
        expected = torch.stack([snapshot[name] for snapshot in snapshots]).mean(0)
        torch.testing.assert_close(param.detach(), expected, msg=name)


# Each run trains digits for 2 epochs on 64 images with one method, model, optimizer and schedule.
COMBINATIONS = [
    ["method=sam", "model=cnn", "model.batch_norm=true", "optimizer=adam", "schedule=step", "schedule.step_size=1", "trainer.precision=bf16"],
    ["method=sam", "method.adaptive=true", "model.batch_norm=true", "schedule=cosine", "trainer.grad_clip=1.0"],
    ["method=swa", "model=cnn", "model.batch_norm=true", "optimizer=adam", "schedule=cosine", "method.swa_start=1", "method.swa_lr=0.0005"],
    ["method=swa", "model.batch_norm=true", "trainer.select=best_val", "trainer.precision=bf16", "method.swa_start=1"],
    ["method=pg_swa", "method.population_size=2", "model.batch_norm=true", "schedule=step", "method.swa_lr=0.005"],
    ["method=weight_noise", "model=cnn", "optimizer=adam", "method.noise_scale=layer", "method.sigma_schedule=cosine"],
]
# The torchvision models take tens of seconds each on a CPU.
HEAVY_COMBINATIONS = [
    ["method=sam", "method.adaptive=true", "model=resnet18", "schedule=cosine", "trainer.grad_clip=1.0"],
    ["method=sam", "model=resnet50", "optimizer=adam"],
    ["method=swa", "model=mobilenet_v2", "schedule=step", "method.swa_lr=0.005"],
    ["method=swa", "model=densenet161", "method.swa_start=1"],
    ["method=pg_swa", "method.population_size=2", "model=shufflenet_v2", "optimizer=adam", "schedule=cosine"],
    ["method=weight_noise", "model=resnet18", "method.noise_scale=filter"],
]
OPTION_CASES = COMBINATIONS + [pytest.param(case, marks=pytest.mark.slow) for case in HEAVY_COMBINATIONS]


@pytest.mark.parametrize("overrides", OPTION_CASES, ids=[" ".join(case) for case in COMBINATIONS + HEAVY_COMBINATIONS])
def test_method_trains_with_options(compose_config, data_root, tmp_path, overrides):
    trainer = make_trainer(
        compose_config,
        data_root,
        tmp_path,
        *overrides,
        "dataset.train_size=64",
        "trainer.batch_size=32",
        "trainer.epochs=2",
    )
    trainer.fit(SignalGuard())
    metrics = trainer.final_metrics()
    assert trainer.progress.epoch == 2
    assert math.isfinite(trainer.progress.history[-1]["train_loss"])
    assert 0 <= metrics["test_accuracy"] <= 1


# End to end through `popgrad train`


def train(monkeypatch, tmp_path, *overrides):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POPGRAD_DATA", str(tmp_path / "data"))
    return main(["train", *overrides])


def read_metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


# (overrides, gradient evaluations per training image and epoch)
END_TO_END = [
    (["method=sam"], 2),
    (["method=swa"], 1),
    (["method=weight_noise"], 1),
    (["method=pg_swa", "method.population_size=2"], 2),
]


@pytest.mark.parametrize("overrides,per_image", END_TO_END, ids=[case[0][0] for case in END_TO_END])
def test_method_trains_digits(monkeypatch, tmp_path, overrides, per_image):
    run_dir = tmp_path / "run"
    exit_code = train(monkeypatch, tmp_path, *overrides, "trainer.epochs=2", f"hydra.run.dir={run_dir}")
    metrics = read_metrics(run_dir)
    assert exit_code == 0, metrics["error"]
    assert metrics["status"] == "completed"
    assert metrics["method"] == overrides[0].split("=")[1]
    assert metrics["gradient_evaluations"] == per_image * 2 * DIGITS_TRAIN_SIZE
    assert metrics["test_f1"] > 0.3
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    if overrides[0] in ("method=swa", "method=pg_swa"):
        # swa_start 0.75 of 2 epochs: only epoch 2 is averaged.
        assert int(state["weight_averaging"]["averaged_model"]["n_averaged"]) == 1
    else:
        assert "weight_averaging" not in state


# Invalid values: (overrides, key named in the error, value shown in it)
BAD_VALUES = [
    (["method=sam", "method.rho=0"], "method.rho", "0.0"),
    (["method=sam", "method.rho=-0.1"], "method.rho", "-0.1"),
    (["method=swa", "method.swa_start=0"], "method.swa_start", "0.0"),
    (["method=swa", "method.swa_start=2.5"], "method.swa_start", "2.5"),
    (["method=swa", "trainer.epochs=2", "method.swa_start=3"], "method.swa_start", "3.0"),
    (["method=pg_swa", "trainer.epochs=2", "method.swa_start=5"], "method.swa_start", "5.0"),
    (["method=swa", "method.swa_lr=0"], "method.swa_lr", "0.0"),
    (["method=swa", "method.swa_anneal_epochs=0"], "method.swa_anneal_epochs", "0"),
    (["method=swa", "method.swa_anneal_strategy=step"], "method.swa_anneal_strategy", "step"),
    (["method=weight_noise", "method.population_size=2"], "method.population_size", "2"),
    (["method=weight_noise", "method.batch=split"], "method.batch", "split"),
    (["method=weight_noise", "method.include_center=true"], "method.include_center", "True"),
]


@pytest.mark.parametrize("overrides,key,value", BAD_VALUES, ids=[" ".join(case[0]) for case in BAD_VALUES])
def test_bad_value_rejected(method_configs, overrides, key, value):
    cfg = config_with(method_configs, overrides)
    with pytest.raises(ConfigError) as raised:
        validate_config(cfg)
    assert key in str(raised.value)
    assert value in str(raised.value)


def test_swa_start_ignored_by_other_methods(method_configs):
    validate_config(config_with(method_configs, ["method=pg", "trainer.epochs=2", "method.swa_start=5"]))


@pytest.mark.parametrize("name", ["sam", "swa", "pg_swa", "weight_noise"])
def test_method_defaults_validate(method_configs, name):
    validate_config(method_configs[name])


def test_bad_value_exit_code(monkeypatch, tmp_path, capsys):
    exit_code = train(monkeypatch, tmp_path, "method=weight_noise", "method.population_size=2")
    assert exit_code == EXIT_INVALID_CONFIG
    assert "method.population_size" in capsys.readouterr().err


# Exact resume of weight averaging

# Epoch 3 is inside SWALR's anneal, so the scheduler's state must survive the interruption.
RESUMED_RUN = [
    "dataset.train_size=400",
    "method=swa",
    "trainer.epochs=4",
    "method.swa_start=2",
    "method.swa_lr=0.005",
    "method.swa_anneal_epochs=3",
    "model.batch_norm=true",
    "model.dropout=0.1",
]
STEPS_PER_EPOCH = math.ceil(400 / 128)
TIME_KEYS = {"train_time_s", "wall_time_s", "overrides"}


class StopAfterChecks:
    """A stand-in for SignalGuard that reports SIGTERM after ``checks`` steps have run."""

    def __init__(self, checks):
        self.checks_left = checks

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @property
    def received(self):
        self.checks_left -= 1
        return "SIGTERM" if self.checks_left < 0 else None


def results_without_times(run_dir):
    metrics = {key: value for key, value in read_metrics(run_dir).items() if key not in TIME_KEYS}
    history = pd.read_csv(run_dir / "history.csv").drop(columns=["epoch_time_s"])
    return metrics, history


def test_swa_resume_is_exact(monkeypatch, tmp_path):
    whole = tmp_path / "whole"
    assert train(monkeypatch, tmp_path, *RESUMED_RUN, f"hydra.run.dir={whole}") == 0

    resumed = tmp_path / "resumed"
    stop_in_third_epoch = 2 * STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2
    with monkeypatch.context() as patch:
        patch.setattr(popgrad_cli.train, "SignalGuard", lambda: StopAfterChecks(stop_in_third_epoch))
        assert train(monkeypatch, tmp_path, *RESUMED_RUN, f"hydra.run.dir={resumed}") == EXIT_INTERRUPTED
    state = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert state["progress"]["epoch"] == 2
    assert state["progress"]["next_batch"] == STEPS_PER_EPOCH // 2
    assert int(state["weight_averaging"]["averaged_model"]["n_averaged"]) == 1

    assert train(monkeypatch, tmp_path, *RESUMED_RUN, f"hydra.run.dir={resumed}") == 0
    metrics, history = results_without_times(resumed)
    expected_metrics, expected_history = results_without_times(whole)
    assert metrics == expected_metrics
    pd.testing.assert_frame_equal(history, expected_history)
