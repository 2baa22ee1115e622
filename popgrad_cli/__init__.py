"""popgrad: train, sweep and compare image classifiers with Population Gradients."""

__version__ = "0.1.0"
