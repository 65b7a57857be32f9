"""The reference the engines are measured against: federated averaging written the way a typical research
script is, in one process with PyTorch's defaults.

Per round: for each sampled client, a deep copy of the global model, a fresh SGD optimizer and a
``DataLoader`` over a ``Subset`` of a ``TensorDataset`` (shuffled, batch ``client.batch_size``); the server
averages the clients' ``state_dict``s weighted by their sizes (in client-id order); the global model is evaluated with a
``DataLoader`` over the test set (batch 1000) under ``torch.no_grad()``. No allocator tuning, no
channels-last, default intra-op threads.

Each client's training seeds torch's global generator first (``seed_client``: its shuffling and any dropout
draw from it), so another runner that trains the same client in another process (benchmarks/flower_sim.py)
draws the same batches.

It is deliberately kind to the baseline in one respect: the images are already standardized tensors in
memory (a script using torchvision's MNIST with a ``ToTensor`` transform pays a PIL conversion per image on
top). It draws the same partition and the same clients per round as fedgap, so every runner in the benchmark
does the same work.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset


def seed_client(cfg, round_: int, client: int) -> None:
    """Seed torch's global generator for one client's update in one round (indexed, not a running stream: the
    same draws in any process and any order)."""
    from fedgap import seeding

    torch.manual_seed(seeding.torch_seed(cfg.seed, seeding.TORCH, round_, client))


def train_client(global_model, dataset, indices, cfg):
    model = copy.deepcopy(global_model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.client.lr, momentum=cfg.client.momentum,
                          weight_decay=cfg.client.weight_decay)
    loader = DataLoader(Subset(dataset, indices), batch_size=cfg.client.batch_size, shuffle=True)
    seen = 0
    for _ in range(cfg.client.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            seen += len(xb)
    return model.state_dict(), len(indices), seen


def average(states, weights):
    total = sum(weights)
    out = {}
    for key in states[0]:
        if states[0][key].is_floating_point():
            out[key] = sum(s[key] * (w / total) for s, w in zip(states, weights, strict=True))
        else:
            out[key] = states[0][key]
    return out


@torch.no_grad()
def evaluate(model, test_set):
    model.eval()
    correct, loss = 0, 0.0
    for xb, yb in DataLoader(test_set, batch_size=1000):
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return correct / len(test_set), loss / len(test_set)


def run(cfg, rounds: int, on_round=None, *, return_model: bool = False):
    """``rounds`` rounds; ``on_round(row)`` gets each round's timing row. Returns the rows (and the final global
    model with ``return_model``)."""
    from fedgap.data.datasets import load_dataset
    from fedgap.data.partition import partition_for
    from fedgap.experiment.loop import initial_model, sample_clients

    data = load_dataset(cfg.data.name, cfg.data.root)
    d = cfg.data
    parts = partition_for(d, data.train_y.numpy(), cfg.seed)
    train_set = TensorDataset(data.train_x, data.train_y)
    test_set = TensorDataset(data.test_x, data.test_y)
    model = initial_model(cfg, data)
    rows = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        results = []
        for c in sample_clients(cfg.seed, r, d.num_clients, cfg.server.clients_per_round):
            seed_client(cfg, r, int(c))
            results.append(train_client(model, train_set, parts[c].tolist(), cfg))
        train_seconds = time.perf_counter() - t0
        model.load_state_dict(average([s for s, _, _ in results], [n for _, n, _ in results]))
        acc, loss = evaluate(model, test_set)
        row = {"round": r, "seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
               "samples": sum(s for _, _, s in results), "test_accuracy": acc, "test_loss": loss}
        rows.append(row)
        if on_round:
            on_round(row)
    return (rows, model) if return_model else rows
