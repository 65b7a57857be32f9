"""Client objectives: exact small checks (the FedProx gradient, SCAFFOLD's and FedDyn's state, each label-skew
loss on two classes with a hand-computed value and one SGD step through local_update) and the two-client
quadratic where FedAvg provably drifts and SCAFFOLD and FedDyn reach the optimum."""

import math

import numpy as np
import pytest
import torch

from fedgap.fl.client import ClientHParams, ClientTask, RoundContext, local_update
from fedgap.fl.objectives import OBJECTIVES, ClientSetup, make_objective, objective_spec
from fedgap.fl.state import weighted_mean


def setup_one(params, start, payload=None, own=None, counts=(1, 1)):
    """A ClientSetup for one client (tensors [1, ...]) from unstacked tensors."""
    return ClientSetup({k: v[None] for k, v in params.items()}, start, payload or {},
                       {k: v[None] for k, v in (own or {}).items()}, torch.tensor([counts]))


def test_fedprox_adds_mu_times_distance_to_global():
    w = torch.tensor([1.0, 2.0])
    grad = torch.tensor([0.5, -0.5])
    obj = make_objective("prox", mu=0.1)
    obj.begin(setup_one({"w": w}, {"w": torch.tensor([0.0, 3.0])}))
    obj.correct({"w": grad[None]})
    assert grad.tolist() == pytest.approx([0.5 + 0.1 * 1.0, -0.5 + 0.1 * (-1.0)])


def test_scaffold_corrects_by_c_minus_ci_and_sets_ci_to_mean_raw_gradient():
    w = torch.tensor([0.0])
    obj = make_objective("scaffold")
    obj.begin(setup_one({"w": w}, {"w": torch.tensor([0.0])}, {"w": torch.tensor([0.3])}, {"w": torch.tensor([0.1])}))
    raw = [1.0, 3.0]
    for g in raw:
        grad = torch.tensor([[g]])
        obj.correct({"w": grad})
        assert grad.item() == pytest.approx(g + 0.3 - 0.1)
    own, upload = obj.end(torch.tensor([2])).client(0)
    assert own["w"].item() == pytest.approx(2.0)  # mean raw gradient
    assert upload["w"].item() == pytest.approx(2.0 - 0.1)  # c_i+ - c_i


def test_scaffold_server_moves_c_by_sum_of_deltas_over_all_clients():
    obj = make_objective("scaffold")
    c = {"w": torch.tensor([1.0])}
    new = obj.server_update(c, [{"w": torch.tensor([0.5])}, {"w": torch.tensor([1.5])}], num_clients=10)
    assert new["w"].item() == pytest.approx(1.0 + (0.5 + 1.5) / 10)  # (|S|/N) * mean over S


def test_feddyn_gradient_client_state_and_server_correction():
    alpha = 0.1
    w = torch.tensor([1.0])
    obj = make_objective("feddyn", alpha=alpha)
    obj.begin(setup_one({"w": w}, {"w": torch.tensor([0.5])}, own={"w": torch.tensor([0.2])}))
    grad = torch.tensor([[0.3]])
    obj.correct({"w": grad})
    assert grad.item() == pytest.approx(0.3 - 0.2 + alpha * (1.0 - 0.5))  # g - h_i + alpha (w - w_global)
    own, upload = obj.end(torch.tensor([1])).client(0)
    assert upload["w"].item() == pytest.approx(0.5)  # w_i - w_global
    assert own["w"].item() == pytest.approx(0.2 - alpha * 0.5)  # h_i - alpha (w_i - w_global)
    h = obj.server_update(obj.server_init({"w": torch.tensor([0.0])}), [upload, {"w": torch.tensor([1.5])}], 4)
    assert h["w"].item() == pytest.approx(-alpha / 4 * (0.5 + 1.5))
    new = obj.server_model({"w": torch.tensor([2.0], dtype=torch.float64)}, h)
    assert new["w"].item() == pytest.approx(2.0 - h["w"].item() / alpha)  # mean - h / alpha


# --- two classes, one sample of class 0, client counts n = (3, 1): each loss by hand ----------------------------
def loss_of(name, logits, counts, y=0, **hp):
    obj = make_objective(name, **hp)
    obj.begin(ClientSetup({}, {}, {}, {}, torch.tensor([counts])))
    return obj.loss(torch.tensor([[logits]], dtype=torch.float64), torch.tensor([[y]])).item()


def test_plain_local_loss_is_cross_entropy():
    assert loss_of("local", [0.0, 0.0], (3, 1)) == pytest.approx(math.log(2))


def test_logit_adjustment_adds_the_log_client_prior():
    # z' = z + tau log(3/4, 1/4): at z = 0 the softmax is the prior, so the loss of class 0 is -log 3/4
    assert loss_of("logit_adjust", [0.0, 0.0], (3, 1)) == pytest.approx(-math.log(0.75))
    assert loss_of("logit_adjust", [0.0, 0.0], (3, 1), tau=0.0) == pytest.approx(math.log(2))


def test_fedlc_subtracts_tau_times_count_to_the_minus_quarter():
    # z' = (0 - 3^-1/4, 0 - 1^-1/4): loss = log(1 + exp(z'_1 - z'_0))
    expected = math.log(1 + math.exp(-1 + 3 ** -0.25))
    assert loss_of("fedlc", [0.0, 0.0], (3, 1), tau=1.0) == pytest.approx(expected)


def test_fedrs_scales_the_logits_of_missing_classes():
    # class 1 is missing: z' = (1, 0.5 * 2) = (1, 1), loss log 2; with alpha 1 it is plain cross-entropy
    assert loss_of("fedrs", [1.0, 2.0], (3, 0), alpha=0.5) == pytest.approx(math.log(2))
    assert loss_of("fedrs", [1.0, 2.0], (3, 0), alpha=1.0) == pytest.approx(math.log(1 + math.e))


def test_label_smoothing_spreads_epsilon_over_the_classes():
    # target (1 - eps/2, eps/2) with eps 0.2; log-softmax of (1, 0) is (-l, -1 - l), l = log(1 + e^-1)
    lse = math.log(1 + math.exp(-1))
    assert loss_of("label_smoothing", [1.0, 0.0], (3, 1), epsilon=0.2) == pytest.approx(0.9 * lse + 0.1 * (1 + lse))


def one_step_result(objective, y, payload=None, params=None):
    """One SGD step (lr 1, no momentum) of a zero-initialized bias-free linear model on x = 1 through
    local_update (the client's ClientResult)."""
    model = torch.nn.Linear(1, 2, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    hp = ClientHParams(seed=0, lr=1.0, momentum=0.0, batch_size=len(y), objective=objective,
                       objective_params=params, num_classes=2, channels_last=False)
    x = torch.ones(len(y), 1, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = RoundContext(1, state, payload or {})
    return local_update(model, x, torch.tensor(y), ctx, ClientTask(0, np.arange(len(y))), hp)


def one_step(objective, y, **params):
    """The two class weights after one step (see ``one_step_result``)."""
    res = one_step_result(objective, y, params=OBJECTIVES[objective].Params(**params))
    return res.state["weight"][:, 0].tolist()


def test_one_step_plain_cross_entropy_leans_toward_the_frequent_class():
    # gradient = mean(softmax(0) - onehot) = (0.5 - 3/4, 0.5 - 1/4)
    assert one_step("local", [0, 0, 0, 1]) == pytest.approx([0.25, -0.25])


def test_one_step_logit_adjustment_does_not_lean():
    # softmax(0 + log prior) = prior = the label frequencies: the mean gradient is exactly zero
    assert one_step("logit_adjust", [0, 0, 0, 1], tau=1.0) == pytest.approx([0.0, 0.0], abs=1e-15)


def test_one_step_fedlc():
    p0 = 1 / (1 + math.exp(-(1 - 3 ** -0.25)))  # softmax of (-3^-1/4, -1) for class 0
    assert one_step("fedlc", [0, 0, 0, 1], tau=1.0) == pytest.approx([0.75 - p0, p0 - 0.75])


def test_one_step_fedrs_damps_the_missing_class():
    # class 1 missing: d loss / d z_1 = alpha * softmax_1 = 0.5 * 0.5; class 0: 0.5 - 1
    assert one_step("fedrs", [0, 0, 0, 0], alpha=0.5) == pytest.approx([0.5, -0.25])


# --- joined objectives: the loss of one, the gradient correction and state of the other ----------------------
C = torch.tensor([[0.1], [-0.1]], dtype=torch.float64)  # SCAFFOLD's server control variate for the weight


def test_logit_adjustment_with_scaffold_steps_by_the_correction_alone():
    # logit adjustment's mean gradient is exactly zero here, so the step is -lr (0 + c - c_i) with c_i = 0
    res = one_step_result("logit_adjust+scaffold", [0, 0, 0, 1], payload={"weight": C})
    assert res.state["weight"][:, 0].tolist() == pytest.approx([-0.1, 0.1], abs=1e-15)
    # c_i+ is the mean raw gradient of the adjusted loss, zero (plain SCAFFOLD would record cross-entropy's)
    assert res.own["objective"]["weight"][:, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-15)
    plain = one_step_result("scaffold", [0, 0, 0, 1], payload={"weight": C})
    assert plain.state["weight"][:, 0].tolist() == pytest.approx([0.25 - 0.1, -0.25 + 0.1])
    assert plain.own["objective"]["weight"][:, 0].tolist() == pytest.approx([-0.25, 0.25])


def test_joined_objective_takes_each_parts_hyper_parameters():
    params = (OBJECTIVES["logit_adjust"].Params(tau=0.0), OBJECTIVES["scaffold"].Params())
    res = one_step_result("logit_adjust+scaffold", [0, 0, 0, 1], payload={"weight": C}, params=params)
    assert res.state["weight"][:, 0].tolist() == pytest.approx([0.25 - 0.1, -0.25 + 0.1])  # tau 0: plain CE


def test_joined_objective_runs_the_gradient_parts_server_side():
    joined = make_objective("fedrs+feddyn", (OBJECTIVES["fedrs"].Params(), OBJECTIVES["feddyn"].Params(alpha=0.5)))
    alone = make_objective("feddyn", alpha=0.5)
    h = {"w": torch.tensor([0.2], dtype=torch.float64)}
    assert joined.server_model({"w": torch.tensor([1.0], dtype=torch.float64)}, h)["w"].item() == \
        alone.server_model({"w": torch.tensor([1.0], dtype=torch.float64)}, h)["w"].item() == pytest.approx(0.6)
    assert joined.name == "fedrs+feddyn"


@pytest.mark.parametrize("spec, canonical", [("scaffold+logit_adjust", "logit_adjust+scaffold"),
                                             ("fedlc + prox", "fedlc+prox"), ("feddyn", "feddyn")])
def test_objective_spec_puts_the_loss_part_first(spec, canonical):
    assert objective_spec(spec) == canonical


@pytest.mark.parametrize("spec, says", [("logit_adjust+fedlc", "cannot be joined"), ("prox+scaffold", "cannot be "
                                        "joined"), ("local+prox", "cannot be joined"), ("fedlc+nope", "'nope'"),
                                        ("logit_adjust+prox+fedlc", "cannot be joined")])
def test_objective_spec_refuses_what_does_not_compose(spec, says):
    with pytest.raises(ValueError, match=says):
        objective_spec(spec)


# --- two clients, f_i(w) = a_i/2 (w - b_i)^2, equal weights, K local GD steps of size lr --------------------
A, B, K, LR = (1.0, 4.0), (0.0, 1.0), 10, 0.1
OPTIMUM = (A[0] * B[0] + A[1] * B[1]) / (A[0] + A[1])  # argmin of the mean of f_i


def fedavg_fixed_point():
    """Closed form: a client from w ends at b_i + (1 - lr a_i)^K (w - b_i); FedAvg averages the two."""
    q = [(1 - LR * a) ** K for a in A]
    # w = mean_i (b_i + q_i (w - b_i))  =>  w (1 - mean q) = mean (b_i (1 - q_i))
    return sum(b * (1 - qi) for b, qi in zip(B, q, strict=True)) / 2 / (1 - sum(q) / 2)


def federate(objective, rounds, **params):
    w = torch.tensor([0.0], dtype=torch.float64)
    obj = make_objective(objective, **params)
    server = obj.server_init({"w": w})
    own = [obj.client_init({"w": w}), obj.client_init({"w": w})]
    for _ in range(rounds):
        finals, uploads = [], []
        for i in range(2):
            p = w.clone()
            client = make_objective(objective, **params)
            client.begin(setup_one({"w": p}, {"w": w}, obj.payload(server), own[i]))
            for _ in range(K):
                grad = (A[i] * (p - B[i]))[None]
                client.correct({"w": grad})
                p -= LR * grad[0]
            own[i], upload = client.end(torch.tensor([K])).client(0)
            finals.append({"w": p.clone()})
            uploads.append(upload)
        w = weighted_mean(finals, [1.0, 1.0])["w"]
        server = obj.server_update(server, uploads, num_clients=2)
        w = obj.server_model({"w": w}, server)["w"]
    return w.item()


def test_fedavg_drifts_to_its_biased_fixed_point():
    assert fedavg_fixed_point() == pytest.approx(0.604126, abs=1e-6)  # golden: the optimum is 0.8
    assert federate("local", 200) == pytest.approx(fedavg_fixed_point(), abs=1e-9)
    assert abs(federate("local", 200) - OPTIMUM) > 0.19


def test_scaffold_reaches_the_global_optimum():
    assert OPTIMUM == pytest.approx(0.8)
    assert federate("scaffold", 200) == pytest.approx(OPTIMUM, abs=1e-9)


def test_feddyn_reaches_the_global_optimum():
    # at a fixed point no client moves, so h = mean_i h_i = mean_i grad f_i(w) = 0: w is the optimum
    assert federate("feddyn", 300, alpha=1.0) == pytest.approx(OPTIMUM, abs=1e-9)


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
