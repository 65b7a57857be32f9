"""Client objectives: the FedProx gradient, SCAFFOLD's control variates, and SCAFFOLD vs FedAvg on a
two-client quadratic where FedAvg provably drifts."""

import pytest
import torch

from fedgap.fl.objectives import ClientSetup, make_objective
from fedgap.fl.state import weighted_mean


def test_fedprox_adds_mu_times_distance_to_global():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    w.grad = torch.tensor([0.5, -0.5])
    obj = make_objective("prox", mu=0.1)
    obj.begin(ClientSetup({"w": w}, {"w": torch.tensor([0.0, 3.0])}, {}, {}))
    obj.correct()
    assert w.grad.tolist() == pytest.approx([0.5 + 0.1 * 1.0, -0.5 + 0.1 * (-1.0)])


def test_scaffold_corrects_by_c_minus_ci_and_sets_ci_to_mean_raw_gradient():
    w = torch.nn.Parameter(torch.tensor([0.0]))
    obj = make_objective("scaffold")
    obj.begin(ClientSetup({"w": w}, {"w": torch.tensor([0.0])}, {"w": torch.tensor([0.3])},
                          {"w": torch.tensor([0.1])}))
    raw = [1.0, 3.0]
    for g in raw:
        w.grad = torch.tensor([g])
        obj.correct()
        assert w.grad.item() == pytest.approx(g + 0.3 - 0.1)
    out = obj.end(steps=2)
    assert out.own["w"].item() == pytest.approx(2.0)  # mean raw gradient
    assert out.upload["w"].item() == pytest.approx(2.0 - 0.1)  # c_i+ - c_i


def test_scaffold_server_moves_c_by_sum_of_deltas_over_all_clients():
    obj = make_objective("scaffold")
    c = {"w": torch.tensor([1.0])}
    new = obj.server_update(c, [{"w": torch.tensor([0.5])}, {"w": torch.tensor([1.5])}], num_clients=10)
    assert new["w"].item() == pytest.approx(1.0 + (0.5 + 1.5) / 10)  # (|S|/N) * mean over S


# --- two clients, f_i(w) = a_i/2 (w - b_i)^2, equal weights, K local GD steps of size lr --------------------
A, B, K, LR = (1.0, 4.0), (0.0, 1.0), 10, 0.1
OPTIMUM = (A[0] * B[0] + A[1] * B[1]) / (A[0] + A[1])  # argmin of the mean of f_i


def fedavg_fixed_point():
    """Closed form: a client from w ends at b_i + (1 - lr a_i)^K (w - b_i); FedAvg averages the two."""
    q = [(1 - LR * a) ** K for a in A]
    # w = mean_i (b_i + q_i (w - b_i))  =>  w (1 - mean q) = mean (b_i (1 - q_i))
    return sum(b * (1 - qi) for b, qi in zip(B, q, strict=True)) / 2 / (1 - sum(q) / 2)


def federate(objective, rounds, mu=0.0):
    w = torch.tensor([0.0], dtype=torch.float64)
    obj = make_objective(objective, mu)
    server = obj.server_init({"w": w})
    own = [{}, {}]
    for _ in range(rounds):
        finals, uploads = [], []
        for i in range(2):
            p = torch.nn.Parameter(w.clone())
            client = make_objective(objective, mu)
            client.begin(ClientSetup({"w": p}, {"w": w}, obj.payload(server), own[i]))
            for _ in range(K):
                p.grad = A[i] * (p.detach() - B[i])
                client.correct()
                with torch.no_grad():
                    p -= LR * p.grad
            out = client.end(K)
            own[i] = out.own
            finals.append({"w": p.detach().clone()})
            uploads.append(out.upload)
        w = weighted_mean(finals, [1.0, 1.0])["w"]
        server = obj.server_update(server, uploads, num_clients=2)
    return w.item()


def test_fedavg_drifts_to_its_biased_fixed_point():
    assert fedavg_fixed_point() == pytest.approx(0.604126, abs=1e-6)  # golden: the optimum is 0.8
    assert federate("local", 200) == pytest.approx(fedavg_fixed_point(), abs=1e-9)
    assert abs(federate("local", 200) - OPTIMUM) > 0.19


def test_scaffold_reaches_the_global_optimum():
    assert OPTIMUM == pytest.approx(0.8)
    assert federate("scaffold", 200) == pytest.approx(OPTIMUM, abs=1e-9)


def test_fedprox_fixed_point_is_between_fedavg_and_the_optimum():
    mu = 1.0
    # Each local step contracts toward p*_i = (a_i b_i + mu w) / (a_i + mu) by r_i = 1 - lr (a_i + mu), so after K
    # steps p = alpha_i + beta_i w (linear in the round's start w); the fixed point solves w = mean_i p.
    alpha, beta = [], []
    for a, b in zip(A, B, strict=True):
        rk = (1 - LR * (a + mu)) ** K
        alpha.append(a * b * (1 - rk) / (a + mu))
        beta.append(mu * (1 - rk) / (a + mu) + rk)
    fixed = (sum(alpha) / 2) / (1 - sum(beta) / 2)
    assert federate("prox", 300, mu=mu) == pytest.approx(fixed, abs=1e-9)
    assert abs(fedavg_fixed_point() - OPTIMUM) > abs(fixed - OPTIMUM) > 0.01  # less drift, still biased
