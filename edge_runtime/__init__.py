"""edgefm device runtime: inference, on-device training and federated sync (no torch)."""

__version__ = "0.1.0"
