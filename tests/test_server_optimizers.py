"""One (and two) steps of each server optimizer against Reddi et al. 2021, Algorithm 2, worked out by hand."""

import math

import pytest
import torch

from fedgap.fl.server import SERVER_OPTIMIZERS

X = [1.0, -2.0]
D1 = [0.5, -0.1]  # first pseudo-gradient
D2 = [-0.2, 0.3]  # second
LR, B1, B2, TAU, MOM = 0.1, 0.9, 0.99, 1e-3, 0.8


def run(name, deltas):
    opt = SERVER_OPTIMIZERS[name](lr=LR, momentum=MOM, beta1=B1, beta2=B2, tau=TAU)
    x = {"w": torch.tensor(X, dtype=torch.float64)}
    state = opt.init(x)
    for d in deltas:
        x, state = opt.step(x, {"w": torch.tensor(d, dtype=torch.float64)}, state)
    return x["w"].tolist()


def adaptive_by_hand(second_moment, deltas):
    out = []
    for j in range(2):
        x, m, v = X[j], 0.0, TAU**2
        for d in deltas:
            m = B1 * m + (1 - B1) * d[j]
            v = second_moment(v, d[j] ** 2)
            x = x + LR * m / (math.sqrt(v) + TAU)
        out.append(x)
    return out


def test_sgd_is_fedavg_scaled():
    assert run("sgd", [D1]) == pytest.approx([1.0 + LR * 0.5, -2.0 - LR * 0.1], abs=1e-15)


def test_momentum_two_steps():
    # v1 = D1, x1 = x0 + lr v1; v2 = mom v1 + D2, x2 = x1 + lr v2
    expected = [X[j] + LR * D1[j] + LR * (MOM * D1[j] + D2[j]) for j in range(2)]
    assert run("momentum", [D1, D2]) == pytest.approx(expected, abs=1e-15)


def test_adam_one_step_golden():
    # m = 0.05, v = 0.99e-6 + 0.0025 -> x = 1 + 0.1 * 0.05 / (sqrt(0.00250099) + 0.001)
    assert run("adam", [D1])[0] == pytest.approx(1.0 + 0.1 * 0.05 / (math.sqrt(0.00250099) + 0.001), abs=1e-15)
    assert run("adam", [D1])[0] == pytest.approx(1.0980201, abs=1e-7)


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("adam", lambda v, d2: B2 * v + (1 - B2) * d2),
        ("yogi", lambda v, d2: v - (1 - B2) * d2 * math.copysign(1.0, v - d2) if v != d2 else v),
        ("adagrad", lambda v, d2: v + d2),
    ],
)
def test_adaptive_two_steps_against_the_formula(name, rule):
    assert run(name, [D1, D2]) == pytest.approx(adaptive_by_hand(rule, [D1, D2]), abs=1e-14)


def test_yogi_grows_v_more_slowly_than_adam_when_gradients_are_large():
    # With v small and Delta^2 large, Yogi adds (1-b2) Delta^2 like Adam but does not shrink v by b2.
    adam, yogi = run("adam", [D1, D1]), run("yogi", [D1, D1])
    assert adam != yogi


def test_inputs_are_not_modified():
    opt = SERVER_OPTIMIZERS["adam"](lr=LR)
    x = {"w": torch.tensor(X, dtype=torch.float64)}
    state = opt.init(x)
    before = {k: v.clone() for k, v in state.items()}
    opt.step(x, {"w": torch.tensor(D1, dtype=torch.float64)}, state)
    assert x["w"].tolist() == X and all(torch.equal(before[k], state[k]) for k in state)
