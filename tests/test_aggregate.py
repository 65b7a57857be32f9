"""The server's round update as a pure function, on toy tensors (no data set, no engine)."""

import pytest
import torch

from fedgap.fl.aggregate import ServerComponents, ServerState, server_update
from fedgap.fl.client import ClientResult
from fedgap.fl.objectives import make_objective
from fedgap.fl.server import AdamServer, ServerOptimizer


def result(cid, n, w, bn, own=None, upload=None):
    return ClientResult(cid, n, {"w": torch.tensor([w]), "bn.running_mean": torch.tensor([bn])}, 0.0, n, 1,
                        own or {}, upload or {})


def start(objective_state=None):
    model = {"w": torch.tensor([2.0]), "bn.running_mean": torch.tensor([0.0]),
             "bn.num_batches_tracked": torch.tensor(7)}
    return ServerState(model, {}, objective_state or {}, {3: {"norm": {"x": torch.tensor([1.0])}}})


def components(opt=None, objective="local", stepped=("w",), **params):
    return ServerComponents(opt or ServerOptimizer(lr=1.0), make_objective(objective, **params), stepped, 10)


def test_fedavg_is_the_sample_weighted_mean_and_counters_stay():
    before = start()
    after = server_update(before, [result(1, 100, 1.0, 0.5), result(2, 300, 5.0, 1.5)], components())
    assert after.model["w"].item() == 4.0  # (100 * 1 + 300 * 5) / 400, exactly (float64 accumulation)
    assert after.model["bn.running_mean"].item() == pytest.approx(1.25)  # buffers: the weighted mean
    assert after.model["bn.num_batches_tracked"].item() == 7  # integer counters are never averaged
    assert before.model["w"].item() == 2.0  # pure: the old state is untouched


def test_the_server_optimizer_steps_only_the_stepped_parameters():
    opt = AdamServer(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    before = ServerState(start().model, opt.init({"w": torch.tensor([2.0], dtype=torch.float64)}), {}, {})
    after = server_update(before, [result(1, 1, 4.0, 3.0)], components(opt))
    # delta 2: m = 0.2, v = 0.99 tau^2 + 0.04, step 0.1 * m / (sqrt(v) + tau)
    v = 0.99 * 1e-6 + 0.01 * 4.0
    assert after.model["w"].item() == pytest.approx(2.0 + 0.1 * 0.2 / (v ** 0.5 + 1e-3), rel=1e-6)
    assert after.model["bn.running_mean"].item() == 3.0  # not stepped: the client mean
    assert after.optimizer["m.w"].item() == pytest.approx(0.2)
    scheduled = server_update(before, [result(1, 1, 4.0, 3.0)], components(opt), lr=0.05)
    # the model is float32: its rounding (1.2e-7 at 2.05) bounds the comparison of the two steps
    assert scheduled.model["w"].item() - 2.0 == pytest.approx((after.model["w"].item() - 2.0) / 2, abs=3e-7)


def test_client_state_is_stored_and_the_objective_has_the_last_word():
    obj = make_objective("feddyn", alpha=0.5)
    before = start(obj.server_init({"w": torch.tensor([2.0])}))
    up = {"w": torch.tensor([1.0])}
    after = server_update(before, [result(4, 1, 3.0, 0.0, {"objective": {"w": torch.tensor([9.0])}}, up)],
                          components(objective="feddyn", alpha=0.5))
    h = -0.5 / 10 * 1.0  # h - alpha / N * sum of uploads
    assert after.objective["w"].item() == pytest.approx(h)
    assert after.model["w"].item() == pytest.approx(3.0 - h / 0.5)  # mean - h / alpha
    assert after.clients[4]["objective"]["w"].item() == 9.0 and 4 not in before.clients
    assert after.clients[3]["norm"]["x"].item() == 1.0  # clients not in the round keep their state


def test_a_state_digest_reads_values_not_layout():
    """summary.json's initial_model_sha256 (fedgap.fl.state.digest): equal for equal values in any memory
    layout; any changed value, dtype, shape or key changes it."""
    from fedgap.fl.state import digest

    w = torch.arange(24.0).reshape(1, 2, 3, 4)
    base = digest({"w": w, "b": torch.zeros(2)})
    assert digest({"w": w.contiguous(memory_format=torch.channels_last), "b": torch.zeros(2)}) == base
    nudged = w.clone()
    nudged[0, 1, 2, 3] = torch.nextafter(nudged[0, 1, 2, 3], torch.tensor(1e9))  # one ulp
    changed = [{"w": nudged, "b": torch.zeros(2)}, {"w": w.double(), "b": torch.zeros(2)},
               {"w": w.reshape(2, 12), "b": torch.zeros(2)}, {"v": w, "b": torch.zeros(2)}]
    assert all(digest(state) != base for state in changed)
