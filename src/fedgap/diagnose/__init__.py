"""The doctor: measure the federated-centralized gap, explain it, tune and combine the remedies, recommend."""
