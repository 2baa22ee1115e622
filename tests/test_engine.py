"""The PG engines on every architecture, and the trainer's options around them."""

import logging

import pytest
import torch
from omegaconf import OmegaConf

from popgrad_cli.config import MethodConfig, ModelConfig
from popgrad_cli.models import build_model
from popgrad_cli.population import PopulationGradient
from popgrad_cli.train import SignalGuard, evaluate, prepare_trainer

ARCHITECTURES = ["mlp", "cnn", "resnet18", "resnet50", "densenet161", "mobilenet_v2", "shufflenet_v2"]
# Depthwise convolutions in float64 are slow on the CPU, so mobilenet_v2 and
# shufflenet_v2 are here too.
HEAVY = {"resnet50", "densenet161", "mobilenet_v2", "shufflenet_v2"}


def engine_gradient(name, engine, batch):
    torch.manual_seed(0)
    model_cfg = OmegaConf.structured(ModelConfig(name=name, dropout=0.0, batch_norm=True))
    model = build_model(model_cfg, (1, 8, 8), 10).double()
    method = OmegaConf.structured(MethodConfig(name="pg", population_size=2, sigma=0.01, engine=engine, batch=batch))
    estimator = PopulationGradient(model, method, total_steps=10)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8, 1, 8, 8, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 10, (8,), generator=generator)
    torch.manual_seed(2)
    estimator.backward(inputs, targets, step=0)
    gradient = torch.cat([param.grad.flatten() for param in model.parameters()])
    running = torch.cat([buf.flatten().double() for buf in model.buffers()])
    return gradient, running


# Split batches exercise the same per-member code on other data, so the costly
# architectures are compared with shared batches only.
ENGINE_CASES = [(name, "shared") for name in ARCHITECTURES] + [(name, "split") for name in ("mlp", "cnn", "resnet18")]


@pytest.mark.parametrize(
    "name,batch",
    [pytest.param(*case, marks=pytest.mark.slow) if case[0] in HEAVY else case for case in ENGINE_CASES],
)
def test_vmap_equals_loop(name, batch):
    # Float64, because BatchNorm over the few values left in deep layers of an
    # 8x8 input amplifies float32 rounding differences between the engines'
    # kernels far beyond 1e-5, although the two compute the same function.
    vmapped, vmap_running = engine_gradient(name, "vmap", batch)
    looped, loop_running = engine_gradient(name, "loop", batch)
    assert float((vmapped - looped).norm() / looped.norm()) <= 1e-5
    torch.testing.assert_close(vmap_running, loop_running)


@pytest.fixture
def trainer_for(compose_config, tmp_path, monkeypatch):
    monkeypatch.setenv("POPGRAD_DATA", str(tmp_path / "data"))

    def _make(*overrides):
        cfg = compose_config("device=cpu", "trainer.progress=false", *overrides)
        return prepare_trainer(cfg, tmp_path)

    return _make


# The loop engine is held equal to vmap above, so it trains the small models only.
TRAINING_CASES = [(name, "vmap") for name in ARCHITECTURES] + [(name, "loop") for name in ("mlp", "cnn", "resnet18")]


@pytest.mark.parametrize(
    "name,engine",
    [pytest.param(*case, marks=pytest.mark.slow) if case[0] not in ("mlp", "cnn") else case for case in TRAINING_CASES],
)
def test_every_architecture_trains_with_pg(trainer_for, name, engine):
    trainer = trainer_for(
        f"model={name}",
        "method=pg",
        "method.population_size=2",
        f"method.engine={engine}",
        "dataset.train_size=64",
        "dataset.val_fraction=0.05",
        "trainer.batch_size=32",
        "trainer.epochs=1",
    )
    trainer.fit(SignalGuard())
    assert trainer.progress.epoch == 1
    assert trainer.progress.gradient_evaluations == 2 * 64
    assert all(torch.isfinite(param).all() for param in trainer.model.parameters())


def test_split_batches_count_used_samples(trainer_for):
    trainer = trainer_for("method=pg", "method.population_size=3", "method.batch=split", "dataset.train_size=100", "trainer.batch_size=32", "trainer.epochs=1")
    trainer.fit(SignalGuard())
    # Batches of 32, 32, 32, 4: each is cut to a multiple of 3.
    assert trainer.progress.gradient_evaluations == 30 + 30 + 30 + 3


def test_split_batch_smaller_than_population_fails_clearly(trainer_for):
    trainer = trainer_for("method=pg", "method.population_size=4", "method.batch=split", "dataset.train_size=33", "trainer.batch_size=16", "trainer.epochs=1")
    # The last batch of the epoch holds one sample, fewer than four members.
    with pytest.raises(ValueError, match="cannot be split among 4 members"):
        trainer.fit(SignalGuard())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_pg_with_every_optimizer_and_schedule(trainer_for, optimizer, schedule):
    trainer = trainer_for("method=pg", "method.population_size=2", f"optimizer={optimizer}", f"schedule={schedule}", "schedule.step_size=1", "dataset.train_size=200", "trainer.epochs=2")
    trainer.fit(SignalGuard())
    assert trainer.progress.epoch == 2
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in trainer.progress.history)


def test_grad_clip_bounds_population_gradient(trainer_for):
    trainer = trainer_for("method=pg", "method.population_size=4", "trainer.grad_clip=0.001", "dataset.train_size=64", "trainer.batch_size=64")
    index = torch.arange(64)
    _, norm_before_clip = trainer._step(index)
    clipped = torch.cat([param.grad.flatten() for param in trainer.model.parameters()]).norm()
    assert float(norm_before_clip) > 0.001
    assert float(clipped) == pytest.approx(0.001, rel=1e-3)


def test_bf16_precision_trains(trainer_for):
    trainer = trainer_for("method=pg", "method.population_size=2", "trainer.precision=bf16", "model=cnn", "dataset.train_size=64", "trainer.epochs=1")
    trainer.fit(SignalGuard())
    assert torch.isfinite(torch.tensor(trainer.progress.history[0]["train_loss"]))


def test_compile_failure_falls_back_to_eager(trainer_for, monkeypatch, caplog):
    def broken_compile(self, *args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    with caplog.at_level(logging.WARNING):
        trainer = trainer_for("trainer.compile=true", "dataset.train_size=64", "trainer.epochs=1")
    assert "torch.compile failed" in caplog.text
    trainer.fit(SignalGuard())
    assert trainer.progress.epoch == 1


def test_evaluation_uses_running_statistics_after_pg(trainer_for):
    trainer = trainer_for("method=pg", "method.population_size=4", "model.batch_norm=true", "dataset.train_size=256", "trainer.epochs=1")
    norm_layer = next(module for module in trainer.model.modules() if isinstance(module, torch.nn.BatchNorm1d))
    trainer.fit(SignalGuard())
    assert int(norm_layer.num_batches_tracked) == trainer.progress.step
    assert float(norm_layer.running_mean.abs().sum()) > 0
    # In eval mode each sample's output depends on the running statistics only,
    # so scoring samples one at a time or all together gives the same result.
    splits = trainer.splits
    one_by_one = evaluate(trainer.model, splits.test_images, splits.test_labels, trainer.transform, 1, splits.num_classes)
    together = evaluate(trainer.model, splits.test_images, splits.test_labels, trainer.transform, 512, splits.num_classes)
    assert one_by_one == pytest.approx(together)
