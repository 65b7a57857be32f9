"""The doctor: measure the federated-centralized gap, explain it, rank the remedies; and sweeps."""
