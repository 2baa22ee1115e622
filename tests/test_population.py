"""Population Gradients: agreement with its definition, engines, options and BatchNorm."""

import copy
import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from popgrad_cli.config import ConfigError, MethodConfig, _validate_method
from popgrad_cli.population import PlainGradient, PopulationGradient


def make_method(**overrides):
    method = OmegaConf.structured(MethodConfig(name="pg", population_size=4, sigma=0.05))
    for key, value in overrides.items():
        method[key] = value
    return method


def small_mlp(batch_norm=False, dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(12, 16)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(16))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, 3))
    return nn.Sequential(*layers)


def batch(size=8):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 12, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def grads(model):
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def relative_difference(actual, expected):
    """Return ||actual - expected|| / ||expected|| over all parameters together."""
    difference = torch.cat([(actual[name] - expected[name]).flatten() for name in expected])
    reference = torch.cat([expected[name].flatten() for name in expected])
    return float(difference.norm() / reference.norm())


def population_grad(model, step=0, seed=0, **overrides):
    estimator = PopulationGradient(model, make_method(**overrides), total_steps=100)
    model.zero_grad()
    torch.manual_seed(seed)
    loss = estimator.backward(*batch(), step=step)
    return grads(model), loss, estimator


def assert_close(actual, expected, rtol=1e-5, atol=1e-7):
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


def test_sigma_zero_equals_plain_gradient():
    model = small_mlp()
    PlainGradient(model).backward(*batch(), step=0)
    plain = grads(model)
    pg, _, _ = population_grad(model, sigma=0.0)
    assert_close(pg, plain)


@pytest.mark.parametrize(
    "noise_scale,antithetic,include_center,batch_mode,engine",
    list(itertools.product(["absolute", "layer", "filter"], [False, True], [False, True], ["shared", "split"], ["vmap", "loop"])),
)
def test_sigma_zero_reduces_to_baseline_for_all_options(noise_scale, antithetic, include_center, batch_mode, engine):
    model = small_mlp()
    inputs, targets = batch()
    population = 5 if include_center else 4
    model.zero_grad()
    if batch_mode == "split":
        # Each member sees a quarter of the batch; the mean of the part losses'
        # gradients equals the whole batch's gradient because the parts are equal.
        population = 4 if not (include_center and antithetic) else 5
        inputs, targets = inputs[: (8 // population) * population], targets[: (8 // population) * population]
    nn.functional.cross_entropy(model(inputs), targets).backward()
    plain = grads(model)
    pg, _, _ = population_grad(
        model,
        sigma=0.0,
        population_size=population,
        noise_scale=noise_scale,
        antithetic=antithetic,
        include_center=include_center,
        batch=batch_mode,
        engine=engine,
    )
    assert_close(pg, plain)


def test_gradient_is_mean_of_perturbed_copies():
    model = small_mlp()
    pg, _, estimator = population_grad(model, population_size=3, sigma=0.1)
    torch.manual_seed(0)
    offsets = estimator.offsets(step=0)
    expected = {name: torch.zeros_like(param) for name, param in model.named_parameters()}
    inputs, targets = batch()
    for k in range(3):
        member = copy.deepcopy(model)
        with torch.no_grad():
            for name, param in member.named_parameters():
                param.add_(offsets[name][k])
        member.zero_grad()
        nn.functional.cross_entropy(member(inputs), targets).backward()
        for name, param in member.named_parameters():
            expected[name] += param.grad / 3
    assert_close(pg, expected)


@pytest.mark.parametrize("batch_mode", ["shared", "split"])
@pytest.mark.parametrize("batch_norm,dropout", [(False, 0.0), (True, 0.0)])
def test_vmap_and_loop_engines_agree(batch_mode, batch_norm, dropout):
    vmapped, vmap_loss, _ = population_grad(small_mlp(batch_norm), batch=batch_mode, engine="vmap")
    looped, loop_loss, _ = population_grad(small_mlp(batch_norm), batch=batch_mode, engine="loop")
    assert relative_difference(vmapped, looped) <= 1e-5
    torch.testing.assert_close(vmap_loss, loop_loss)


def test_chunks_give_the_same_gradient():
    whole, _, _ = population_grad(small_mlp(batch_norm=True), population_size=6)
    chunked, _, _ = population_grad(small_mlp(batch_norm=True), population_size=6, chunk_size=4)
    assert_close(chunked, whole)


def test_same_seed_same_gradient():
    first, _, _ = population_grad(small_mlp(), seed=3)
    second, _, _ = population_grad(small_mlp(), seed=3)
    third, _, _ = population_grad(small_mlp(), seed=4)
    assert_close(second, first, rtol=0, atol=0)
    assert not torch.equal(third["1.weight"], first["1.weight"])


def test_fixed_resample_keeps_offsets():
    model = small_mlp()
    estimator = PopulationGradient(model, make_method(resample="fixed"), total_steps=10)
    first = estimator.offsets(step=0)
    second = estimator.offsets(step=1)
    assert torch.equal(first["1.weight"], second["1.weight"])
    stepwise = PopulationGradient(model, make_method(resample="step"), total_steps=10)
    assert not torch.equal(stepwise.offsets(0)["1.weight"], stepwise.offsets(1)["1.weight"])


def test_antithetic_offsets_come_in_pairs():
    estimator = PopulationGradient(small_mlp(), make_method(antithetic=True), total_steps=10)
    offsets = estimator.offsets(step=0)["1.weight"]
    torch.testing.assert_close(offsets[:2], -offsets[2:])


def test_include_center_has_zero_offset():
    estimator = PopulationGradient(small_mlp(), make_method(include_center=True, population_size=3), total_steps=10)
    offsets = estimator.offsets(step=0)["1.weight"]
    assert torch.count_nonzero(offsets[0]) == 0
    assert torch.count_nonzero(offsets[1]) > 0


def test_noise_scales():
    model = small_mlp()
    weight = model[1].weight
    torch.manual_seed(0)
    absolute = PopulationGradient(model, make_method(noise_scale="absolute", sigma=1.0), 10).offsets(0)["1.weight"]
    torch.manual_seed(0)
    layer = PopulationGradient(model, make_method(noise_scale="layer", sigma=1.0), 10).offsets(0)["1.weight"]
    torch.manual_seed(0)
    filter_wise = PopulationGradient(model, make_method(noise_scale="filter", sigma=1.0), 10).offsets(0)["1.weight"]
    rms = weight.detach().pow(2).mean().sqrt()
    row_norms = weight.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer, absolute * rms)
    torch.testing.assert_close(filter_wise, absolute * row_norms)


def test_sigma_schedules():
    linear = PopulationGradient(small_mlp(), make_method(sigma=1.0, sigma_final=0.0, sigma_schedule="linear"), 100)
    cosine = PopulationGradient(small_mlp(), make_method(sigma=1.0, sigma_final=0.2, sigma_schedule="cosine"), 100)
    assert linear.sigma_at(0) == pytest.approx(1.0)
    assert linear.sigma_at(50) == pytest.approx(0.5)
    assert linear.sigma_at(100) == pytest.approx(0.0)
    assert cosine.sigma_at(50) == pytest.approx(0.6)
    assert cosine.sigma_at(100) == pytest.approx(0.2)


def test_split_batches_give_members_distinct_parts():
    estimator = PopulationGradient(small_mlp(), make_method(batch="split"), 10)
    inputs, targets = batch(10)
    member_inputs, member_targets = estimator.member_batches(inputs, targets)
    assert member_inputs.shape == (4, 2, 12)
    torch.testing.assert_close(member_inputs.reshape(8, 12), inputs[:8])
    assert estimator.gradient_evaluations(10) == 8


def test_shared_batches_count_every_member():
    estimator = PopulationGradient(small_mlp(), make_method(), 10)
    assert estimator.gradient_evaluations(10) == 40


def test_batchnorm_running_stats_updated_once_from_member_mean():
    model = small_mlp(batch_norm=True)
    bn = model[2]
    inputs, targets = batch()
    estimator = PopulationGradient(model, make_method(population_size=3, sigma=0.2), 10)
    torch.manual_seed(0)
    offsets = estimator.offsets(0)
    hidden_means, hidden_vars = [], []
    for k in range(3):
        weight = model[1].weight + offsets["1.weight"][k]
        bias = model[1].bias + offsets["1.bias"][k]
        hidden = (inputs @ weight.T + bias).detach()
        hidden_means.append(hidden.mean(0))
        hidden_vars.append(hidden.var(0, unbiased=True))
    momentum = bn.momentum
    expected_mean = (1 - momentum) * bn.running_mean + momentum * torch.stack(hidden_means).mean(0)
    expected_var = (1 - momentum) * bn.running_var + momentum * torch.stack(hidden_vars).mean(0)

    torch.manual_seed(0)
    estimator.backward(inputs, targets, step=0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert int(bn.num_batches_tracked) == 1


def test_dropout_masks_differ_between_members():
    model = small_mlp(dropout=0.5)
    estimator = PopulationGradient(model, make_method(sigma=0.0, population_size=2), 10)
    inputs, targets = batch()
    losses = estimator._run_chunk_vmap(
        dict(model.named_parameters()),
        estimator.offsets(0),
        {},
        inputs,
        targets,
        slice(0, 2),
    )
    assert losses[0] != losses[1]


class PolynomialLoss(nn.Module):
    """A model whose output is a fixed function of its weights, so the loss is known in closed form."""

    def __init__(self, weights, function):
        super().__init__()
        self.w = nn.Parameter(weights.clone())
        self.function = function

    def forward(self, inputs):
        return self.function(self.w).expand(inputs.shape[0])


def mean_output(outputs, targets):
    return outputs.mean()


def test_matches_smoothed_gradient_on_quadratic():
    torch.manual_seed(0)
    hessian = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
    offset = torch.tensor([0.5, -1.0, 2.0])
    model = PolynomialLoss(torch.tensor([1.0, -0.5, 0.25]), lambda w: 0.5 * w @ hessian @ w + offset @ w)
    draws, sigma = 20000, 0.3
    estimator = PopulationGradient(model, make_method(population_size=draws, sigma=sigma, chunk_size=5000), 10, loss_fn=mean_output)
    estimator.backward(*batch(), step=0)
    # For a quadratic, E[grad L(w + sigma eps)] = H w + b, and the estimate's
    # error is H sigma mean(eps), whose standard deviation per coordinate is
    # sigma * ||H_i|| / sqrt(draws).
    expected = hessian @ model.w.detach() + offset
    tolerance = 4 * sigma * hessian.norm(dim=1) / math.sqrt(draws)
    error = (model.w.grad - expected).abs()
    assert torch.all(error < tolerance), (error, tolerance)


def test_antithetic_reduces_variance_on_cubic():
    weights = torch.tensor([0.5, -1.0, 0.2, 1.5])

    def estimates(antithetic):
        model = PolynomialLoss(weights, lambda w: (w**3).sum())
        estimator = PopulationGradient(model, make_method(population_size=2, sigma=0.3, antithetic=antithetic), 10, loss_fn=mean_output)
        torch.manual_seed(0)
        samples = []
        for _ in range(300):
            model.zero_grad()
            estimator.backward(*batch(), step=0)
            samples.append(model.w.grad.clone())
        return torch.stack(samples)

    independent = estimates(antithetic=False)
    paired = estimates(antithetic=True)
    assert paired.var(dim=0).sum() < 0.5 * independent.var(dim=0).sum()
    # Both estimate the smoothed gradient 3 w^2 + 3 sigma^2.
    expected = 3 * weights**2 + 3 * 0.3**2
    torch.testing.assert_close(paired.mean(0), expected, atol=0.05, rtol=0)


def test_bad_method_values_rejected():
    cases = [
        ({"population_size": 0}, "method.population_size"),
        ({"sigma": -1.0}, "method.sigma"),
        ({"sigma": float("nan")}, "method.sigma"),
        ({"antithetic": True, "population_size": 3}, "method.population_size"),
        ({"noise_scale": "global"}, "method.noise_scale"),
        ({"batch": "split", "population_size": 64}, "trainer.batch_size"),
        ({"engine": "jit"}, "method.engine"),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _validate_method(make_method(**overrides), batch_size=32)
