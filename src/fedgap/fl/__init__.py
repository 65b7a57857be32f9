"""Federated learning core: client updates, server optimizers, the norm policy, the round loop."""
