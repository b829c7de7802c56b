"""auditor: neuron-by-neuron audits of PyTorch image models."""

__version__ = "0.1.0"
