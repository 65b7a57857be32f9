"""fedgap: measure and close the accuracy gap between centralized and federated training."""

__version__ = "0.1.0"
