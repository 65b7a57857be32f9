"""Diagnostics of a federated run: where does the accuracy gap come from?

Measured on the global model at every evaluation round (``eval.diagnostics=true``; the doctor turns it on for
the naive run). None of them changes the run's numbers: they only read states and run extra forward passes.

- **BatchNorm statistics divergence**, per BN layer. For each sampled client, the per-channel mean and variance
  of the layer's input over (up to ``max_samples`` of) the client's data, with the global model in eval mode,
  i.e. the statistics that the client's batches have at that layer. Their distance to the global running
  statistics (the ones the model normalizes with at test time) is ``bn_divergence``. It splits into two parts
  that are also reported: ``bn_running_error``, the distance between the population statistics (all sampled
  clients' data pooled) and the running statistics (what exact recalibration would remove), and
  ``bn_client_spread``, the mean distance of the clients' statistics to the population (the label skew that
  keeps any single set of statistics from fitting every client). The distance is the 2-Wasserstein distance
  between the two per-channel Gaussians in units of the reference standard deviation,
  ``sqrt((m_a - m_b)^2 + (s_a - s_b)^2) / s_b``, averaged over channels; layers are averaged for the headline
  number, and each layer has its own column ``bn_divergence[<layer>]``.
- **Train-mode vs eval-mode accuracy**: the global model on the test set with BatchNorm normalizing by each
  test batch's own statistics (``train_mode_accuracy``) beside the usual eval-mode ``test_accuracy``. A large
  positive difference is the BN mismatch made visible: the weights are fine, the running statistics are not.
- **Client drift**: the clients' parameter updates Delta_i = y_i - x around their sample-weighted mean Delta:
  ``client_drift`` = sqrt(sum_i p_i ||Delta_i - Delta||^2) / ||Delta|| (0 when all clients agree; above 1
  when they disagree more than they agree) and ``update_cosine``, the weighted mean cosine between Delta_i
  and Delta.
- **Per-client accuracy**: the global model on a test subset drawn with each sampled client's label
  proportions; mean, standard deviation, minimum and maximum over the clients (``client_acc_*``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedgap.callbacks import RoundCallback
from fedgap.fl.batchnorm import BatchNormLayer, batchnorm_layers
from fedgap.fl.device import model_device
from fedgap.fl.evaluate import fixed_shape_batches, label_matched_accuracy
from fedgap.fl.normpolicy import Moments, input_moments, sum_moments

EPS = 1e-5  # BatchNorm's default eps: the distance stays finite for channels with (almost) no variance


def gaussian_distance(mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor,
                      var_b: torch.Tensor) -> float:
    """Channel-mean 2-Wasserstein distance between N(mean_a, var_a) and N(mean_b, var_b), in units of the
    standard deviation of b."""
    sd_a, sd_b = (var_a.double() + EPS).sqrt(), (var_b.double() + EPS).sqrt()
    w2 = ((mean_a.double() - mean_b.double()) ** 2 + (sd_a - sd_b) ** 2).sqrt()
    return float((w2 / sd_b).mean())


@dataclass
class BNDivergence:
    divergence: dict[str, float]  # layer -> weighted mean over clients of d(client, running)
    running_error: dict[str, float]  # layer -> d(pooled, running)
    client_spread: dict[str, float]  # layer -> weighted mean over clients of d(client, pooled)

    def means(self) -> dict[str, float]:
        mean = lambda d: float(np.mean(list(d.values()))) if d else math.nan  # noqa: E731
        return {"bn_divergence": mean(self.divergence), "bn_running_error": mean(self.running_error),
                "bn_client_spread": mean(self.client_spread)}


def bn_divergence(clients: Sequence[Mapping[str, Moments]], state: Mapping[str, torch.Tensor],
                  bn_layers: Mapping[str, BatchNormLayer]) -> BNDivergence:
    """Divergence of clients' BatchNorm input statistics from the running statistics in ``state`` (the layers'
    keys from ``bn_layers``); clients are weighted by how many values they contributed (their sample counts)."""
    out = BNDivergence({}, {}, {})
    if not clients:
        return out
    for layer in clients[0]:
        run_mean, run_var = state[bn_layers[layer].mean_key], state[bn_layers[layer].var_key]
        moments = [c[layer] for c in clients]
        weights = np.array([m.count for m in moments], dtype=np.float64)
        weights /= weights.sum()
        pooled = sum_moments(moments)
        out.divergence[layer] = float(sum(w * gaussian_distance(m.mean, m.var, run_mean, run_var)
                                          for w, m in zip(weights, moments, strict=True)))
        out.running_error[layer] = gaussian_distance(pooled.mean, pooled.var, run_mean, run_var)
        out.client_spread[layer] = float(sum(w * gaussian_distance(m.mean, m.var, pooled.mean, pooled.var)
                                             for w, m in zip(weights, moments, strict=True)))
    return out


@dataclass
class Drift:
    relative_spread: float  # sqrt(sum_i p_i ||d_i - d||^2) / ||d||
    mean_cosine: float  # sum_i p_i cos(d_i, d)


def client_drift(start: Mapping[str, torch.Tensor], finals: Sequence[Mapping[str, torch.Tensor]],
                 weights: Sequence[float], keys: Sequence[str]) -> Drift:
    """Spread of the clients' updates (final - start over ``keys``) around their weighted mean."""
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    x = torch.cat([start[k].reshape(-1).double() for k in keys])
    deltas = torch.stack([torch.cat([f[k].reshape(-1).double() for k in keys]) - x for f in finals])
    mean = (p[:, None] * deltas).sum(0)
    norm = float(mean.norm())
    spread = float((p * ((deltas - mean) ** 2).sum(1)).sum().sqrt())
    cos = torch.nn.functional.cosine_similarity(deltas, mean[None, :].expand_as(deltas), dim=1, eps=1e-30)
    return Drift(spread / norm if norm > 0 else (0.0 if spread == 0 else math.inf), float((p * cos).sum()))


class Diagnostics(RoundCallback):
    """The round callback that measures all of the above at every evaluation round."""

    def __init__(self, max_samples: int = 512, personal_size: int = 500):
        self.max_samples, self.personal_size = max_samples, personal_size

    def on_round_end(self, info) -> dict[str, Any]:
        if not info.evaluated:
            return {}
        exp, state = info.run, info.state
        data, engine = exp.data, exp.engine
        results = info.output.results
        if not results:
            return {}
        row: dict[str, Any] = {}
        weights = [float(r.num_samples) for r in results]
        drift = client_drift(info.previous_state, [r.state for r in results], weights, exp.param_keys)
        row["client_drift"], row["update_cosine"] = drift.relative_spread, drift.mean_cosine
        if exp.bn_layers:
            row["train_mode_accuracy"] = engine.evaluate_test(state, train_mode=True).accuracy
            moments = []
            for r in results:
                rows = exp.parts[r.client_id][: self.max_samples]
                moments.append(input_moments(engine.model, state, data.train_x[torch.from_numpy(rows)],
                                             exp.bn_layers, batch_size=512))
            div = bn_divergence(moments, state, batchnorm_layers(engine.model))
            row.update(div.means())
            row.update({f"bn_divergence[{layer}]": v for layer, v in div.divergence.items()})
        train_y = data.train_y.numpy()
        accs = [a for r in results for a in [label_matched_accuracy(
            engine.evaluate, state, data.test_x, data.test_y, train_y[exp.parts[r.client_id]], self.personal_size,
            exp.cfg.seed, r.client_id)] if a is not None]
        if accs:
            a = np.array(accs)
            row.update(client_acc_mean=float(a.mean()), client_acc_std=float(a.std()),
                       client_acc_min=float(a.min()), client_acc_max=float(a.max()))
        round_labels = np.concatenate([train_y[exp.parts[r.client_id]] for r in results])
        row.update(classifier_bias(engine.model, state, data.test_x, data.test_y, round_labels, data.num_classes,
                                   exp.cfg.eval.batch_size))
        return row


@torch.inference_mode()
def classifier_bias(model: torch.nn.Module, state, x: torch.Tensor, y: torch.Tensor, round_labels: np.ndarray,
                    num_classes: int, batch_size: int = 500) -> dict[str, float]:
    """How the global model's classifier leans: its per-class recall on the test set (min and max), and
    ``prediction_lean`` = sum_c q_c p_pred(c) / sum_c q_c p_true(c) - 1, where q is the label mix of the round's
    clients: 0 when the predictions follow the true labels, 0.3 when they put 30% more weight on the classes
    this round's clients held (the classifier drifting toward them under label skew)."""
    model.load_state_dict(state)
    model.eval()
    device = model_device(model)  # engine.device
    preds = torch.cat([model(xb.to(device))[:n].argmax(1).cpu() for xb, n in fixed_shape_batches(x, batch_size)])
    true = np.bincount(y.numpy(), minlength=num_classes).astype(float)
    hits = np.bincount(y.numpy()[(preds == y).numpy()], minlength=num_classes)
    recall = hits[true > 0] / true[true > 0]
    predicted = np.bincount(preds.numpy(), minlength=num_classes).astype(float)
    q = np.bincount(round_labels, minlength=num_classes).astype(float)
    q /= max(q.sum(), 1.0)
    lean = float(q @ (predicted / len(y)) / max(q @ (true / len(y)), 1e-12) - 1)
    return {"class_recall_min": float(recall.min()), "class_recall_max": float(recall.max()),
            "prediction_lean": lean}
