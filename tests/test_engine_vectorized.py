"""The vectorized engine reproduces local_update: exactly in float64 (so the math is the same, op for op), and
to float rounding in float32 for one step.

Tolerances. In float64 a cohort agrees with per-client local_update to ~1e-13 (checked at rtol 1e-9, atol
1e-11): what is left is the summation order inside grouped vs per-client kernels. End to end (two rounds of
unequal clients through the real round loop) the tests also run in float64 (``float64_runs``), where the
sequential and vectorized final models agree to 3e-15 (AdamW 3e-12, its m / sqrt(v) amplifying rounding of
near-zero gradients), checked at rtol 1e-9, atol 1e-9: six orders of magnitude of margin, on any CPU, while a
wrong update (a dropped correction term, a wrong lr) moves weights by 1e-4 and more. They used to run in
float32 with atol 3e-4, which one AMD AVX2 CPU exceeded (3.5e-4): after many steps a float32 result depends on
which oneDNN kernels the CPU gets, so float32 is only compared after a single step (rtol 1e-5, atol 1e-6: one
step's gradient is a sum of at most a few thousand products, rounding ~1e-7 relative, times lr 0.05).
"""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_args
from fedgap.config import load_config
from fedgap.data.datasets import load_dataset
from fedgap.engines.cohort_model import CohortModel, StepRows
from fedgap.engines.vectorized import batch_table, num_steps, train_cohort
from fedgap.errors import ConfigError
from fedgap.experiment.loop import Experiment, initial_model
from fedgap.fl.client import ClientHParams, ClientTask, RoundContext, client_objective, local_update
from fedgap.fl.objectives import GRADIENT, LOSS, OBJECTIVES
from fedgap.models import build_model
from fedgap.models.norm import float_norm_keys

CPU = torch.device("cpu")
SIZES = [11, 3, 6, 8]  # batch 4: 3, 1, 2, 2 steps; short last batches of 3 and 2 rows, a 3-row client, full ones


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on two shared, busy cores a second OpenMP thread mostly spins (measured: 10-30x the
    CPU time of these tiny steps). Engines set their own threads from engine.threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_idx):
    return load_dataset("idx", tiny_idx)


def setup(data, overrides, sizes=SIZES, dtype=torch.float64):
    """A model, hyper-parameters, a round context and unequal tasks, with SCAFFOLD variates and FedBN norm
    layers that differ per client so that every per-client input matters."""
    cfg = load_config(overrides=["client.batch_size=4", "engine.channels_last=false", *overrides])
    model = initial_model(cfg, data).to(dtype)
    hp = ClientHParams.from_config(cfg, float_norm_keys(model), data.num_classes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    rows = np.random.default_rng(0).permutation(len(data.train_y))
    tasks, start = [], 0
    for i, n in enumerate(sizes):
        tasks.append(ClientTask(3 * i + 1, rows[start : start + n]))
        start += n
    params = {k: state[k] for k, _ in model.named_parameters()}
    objective = client_objective(hp)  # random server and client state, whatever the objective keeps
    payload = objective.payload({k: 0.01 * torch.randn(v.shape, generator=gen, dtype=dtype)
                                 for k, v in objective.server_init(params).items()})
    own = objective.client_init(params)
    if own:
        tasks[0].own["objective"] = {k: 0.01 * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in own.items()}
    if hp.norm_policy == "local":
        tasks[1].own["norm"] = {k: state[k] + 0.1 * torch.rand(state[k].shape, generator=gen, dtype=dtype)
                                for k in hp.norm_keys}
    return cfg, model, hp, RoundContext(2, state, payload), tasks


def run_both(data, cfg, model, hp, ctx, tasks, dtype):
    x = data.train_x.to(dtype)
    if cfg.engine.channels_last:
        model = model.to(memory_format=torch.channels_last)
    seq = {t.client_id: local_update(model, x, data.train_y, ctx, t, hp) for t in tasks}
    order = sorted(tasks, key=lambda t: -num_steps(len(t.indices), hp))
    cm = CohortModel(build_model(cfg.model), cfg.engine.channels_last)
    vec = {r.client_id: r for r in train_cohort(cm, x, data.train_y, ctx, order, hp, CPU)}
    return seq, vec


def assert_close_states(a, b, rtol, atol):
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_same_result(s, v, rtol, atol, start):
    assert (v.client_id, v.num_samples, v.samples, v.steps) == (s.client_id, s.num_samples, s.samples, s.steps)
    assert v.train_loss == pytest.approx(s.train_loss, rel=rtol, abs=atol)
    assert_close_states(s.state, v.state, rtol, atol)
    assert s.own.keys() == v.own.keys() and s.upload.keys() == v.upload.keys()
    for key in s.own:
        assert_close_states(s.own[key], v.own[key], rtol, atol)
    assert_close_states(s.upload, v.upload, rtol, atol)
    assert any(not torch.equal(s.state[k], start[k]) for k in s.state)  # it trained


CASES = {
    "sgd-momentum-wd-augment-dropout": ["client.weight_decay=0.001", "client.augment=true", "model.dropout=0.3"],
    "adam-wd": ["client.optimizer=adam", "client.lr=0.001", "client.weight_decay=0.01"],
    "adamw": ["client.optimizer=adamw", "client.lr=0.001", "client.weight_decay=0.01", "client.epochs=2"],
    "fedprox": ["server.algorithm=fedprox", "server.mu=0.5"],
    "scaffold": ["server.algorithm=scaffold", "client.weight_decay=0.001"],
    "fedbn-2-epochs": ["server.algorithm=fedbn", "client.epochs=2"],
    "group-norm-nchw": ["model.norm=group", "engine.channels_last=false"],
    "cnn-layer-norm-dropout": ["model.name=cnn", "model.norm=layer", "model.dropout=0.5"],
    "cnn-no-norm": ["model.name=cnn", "model.norm=none", "client.momentum=0", "client.lr=0.1"],
    "simple-cnn": ["model.name=simple-cnn", "client.weight_decay=0.001"],
    "mobilenet-v1-instance": ["model.name=mobilenet-v1", "model.width=0.25", "model.norm=instance"],
    "mobilenet-v2-dropout": ["model.name=mobilenet-v2", "model.width=0.25", "model.dropout=0.2",
                             "client.lr=0.01"],
}


# Every registered objective, with non-default hyper-parameters where it has any: a new objective is tested here
# without anyone adding a case (clients of 3-11 samples hold few classes, so label counts differ and miss some).
def objective_case(spec: str) -> list[str]:
    return [f"client.objective={spec}", "server.mu=0.3",
            *(f"objective.{name}.{field}=0.3" for name in spec.split("+")
              for field in OBJECTIVES[name].Params.model_fields if OBJECTIVES[name].own_section)]


OBJECTIVE_CASES = {f"objective-{name}": objective_case(name) for name in OBJECTIVES}
# Every join of a loss objective and a gradient objective (fedgap.fl.objectives.composite), for the cohort check;
# two of them end to end.
JOINED = [f"{a}+{b}" for a, ca in OBJECTIVES.items() if ca.role == LOSS for b, cb in OBJECTIVES.items()
          if cb.role == GRADIENT]
JOINED_CASES = {f"objective-{spec}": objective_case(spec) for spec in JOINED}
JOINED_E2E = {k: JOINED_CASES[k] for k in ("objective-logit_adjust+scaffold", "objective-fedrs+feddyn")}


@pytest.mark.parametrize("overrides", [*CASES.values(), *OBJECTIVE_CASES.values(), *JOINED_CASES.values()],
                         ids=[*CASES.keys(), *OBJECTIVE_CASES.keys(), *JOINED_CASES.keys()])
def test_cohort_equals_local_update_in_float64(tiny, overrides):
    cfg, model, hp, ctx, tasks = setup(tiny, overrides)
    seq, vec = run_both(tiny, cfg, model, hp, ctx, tasks, torch.float64)
    assert sorted(vec) == sorted(seq)
    for cid in seq:
        assert_same_result(seq[cid], vec[cid], 1e-9, 1e-11, ctx.global_state)


@pytest.mark.parametrize("sizes", [[8, 8, 8], [8, 5, 3, 1]], ids=["full-batches", "short-batches"])
def test_one_cohort_step_equals_per_client_steps_in_float32(tiny, sizes):
    cfg, model, hp, ctx, tasks = setup(tiny, ["client.batch_size=8", "engine.channels_last=true",
                                              "client.weight_decay=0.001", "model.dropout=0.3"], sizes, torch.float32)
    seq, vec = run_both(tiny, cfg, model, hp, ctx, tasks, torch.float32)
    for cid in seq:
        assert seq[cid].steps == 1
        assert_same_result(seq[cid], vec[cid], 1e-5, 1e-6, ctx.global_state)


def test_a_finished_client_does_not_move_while_others_train(tiny):
    """The 3-sample client stops after 1 of the cohort's 3 steps: its parameters, running statistics,
    momentum and gradient sum must stay frozen, so it ends exactly where it ends training alone."""
    cfg, model, hp, ctx, tasks = setup(tiny, ["server.algorithm=scaffold"])
    order = sorted(tasks, key=lambda t: -num_steps(len(t.indices), hp))
    cm = CohortModel(build_model(cfg.model))
    x = tiny.train_x.double()
    together = {r.client_id: r for r in train_cohort(cm, x, tiny.train_y, ctx, order, hp, CPU)}
    short = next(t for t in tasks if len(t.indices) == 3)
    alone = train_cohort(cm, x, tiny.train_y, ctx, [short], hp, CPU)[0]
    assert together[short.client_id].steps == 1 < max(r.steps for r in together.values()) == 3
    assert_close_states(alone.state, together[short.client_id].state, 1e-12, 1e-14)
    assert_close_states(alone.upload, together[short.client_id].upload, 1e-12, 1e-14)


def test_batch_table_follows_epoch_orders_and_pads_short_batches(tiny):
    _, _, hp, ctx, tasks = setup(tiny, ["client.epochs=2", "client.batch_size=8"], sizes=[10, 3])
    table = batch_table(ctx, tasks, hp)
    assert table.shape == (2, 4, 8)  # 10 samples: 2 batches per epoch, 2 epochs
    from fedgap.fl.client import epoch_orders

    first = epoch_orders(hp, ctx.round, tasks[0].client_id, 10)
    assert list(table[0, 0]) == list(tasks[0].indices[first[0][:8]])
    assert list(table[0, 1, :2]) == list(tasks[0].indices[first[0][8:]]) and (table[0, 1, 2:] == -1).all()
    assert list(table[0, 2]) == list(tasks[0].indices[first[1][:8]])
    assert (table[1, 2:] == -1).all() and (table[1, :2, 3:] == -1).all()  # 3 samples: one short batch per epoch


def test_masked_batch_norm_uses_only_real_rows():
    """BatchNorm of a padded cohort batch = torch's BatchNorm of each client's real rows (output and running
    statistics, with torch's unbiased running variance); padded rows, whatever they hold, change nothing."""
    torch.manual_seed(0)
    counts, b, c = [6, 2, 4], 6, 3
    bns = [nn.BatchNorm2d(c).double() for _ in counts]
    for bn in bns:
        nn.init.uniform_(bn.weight)
        nn.init.uniform_(bn.bias)
    x = torch.randn(len(counts), b, c, 5, 5, dtype=torch.float64)
    mask = torch.arange(b)[None, :] < torch.tensor(counts)[:, None]  # [A, B]
    x[~mask] = 1e3  # garbage in padded rows
    stacked = {f"bn.{k}": torch.stack([getattr(bn, k).detach() for bn in bns])
               for k in ("weight", "bias", "running_mean", "running_var")}
    out = CohortModel(nn.Sequential())._module("bn", nn.BatchNorm2d(c), x.transpose(0, 1).reshape(b, -1, 5, 5),
                                                stacked, StepRows(len(counts), b, counts, mask.t()))
    out = out.reshape(b, len(counts), c, 5, 5).transpose(0, 1)
    for i, (bn, n) in enumerate(zip(bns, counts, strict=True)):
        ref = bn.train()(x[i, :n])
        torch.testing.assert_close(out[i, :n], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stacked["bn.running_mean"][i], bn.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(stacked["bn.running_var"][i], bn.running_var, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------- end to end
E2E = {
    "fedavg-bn-sgd-wd-augment": ["client.weight_decay=0.001", "client.augment=true"],
    "fedprox": ["server.algorithm=fedprox", "server.mu=0.1"],
    "scaffold": ["server.algorithm=scaffold"],
    "fedbn": ["server.algorithm=fedbn"],
    "fedavg-group-norm": ["model.norm=group"],
    "fedavg-adamw": ["client.optimizer=adamw", "client.lr=0.003", "client.weight_decay=0.01"],
    # the round's lr scale reaches the cohort optimizer; the server's running average follows the states
    "fedavg-lr-decay-average": ["client.lr_decay=0.5", "server.average=1"],
    # FedNova rescales by each client's step count: the cohort must report the per-client counts
    "fednova-simple-cnn": ["server.algorithm=fednova", "model.name=simple-cnn", "client.weight_decay=0.00001"],
}


def experiment(root, *extra, out=None, **kwargs):
    args = [*tiny_args(root), "data.partition=dirichlet", "server.clients_per_round=4", "client.batch_size=16",
            "engine.threads=1", *extra]
    exp = Experiment(load_config(overrides=args), out, show_progress=False, **kwargs)
    exp.run()
    return exp


@pytest.fixture
def float64_runs(monkeypatch):
    """Whole runs in float64: models are built in the default dtype, and the data set the loop loads is cast."""
    import fedgap.experiment.loop as loop

    load = loop.load_dataset

    def load_float64(*args, **kwargs):
        data = load(*args, **kwargs)
        return dataclasses.replace(data, train_x=data.train_x.double(), test_x=data.test_x.double())

    monkeypatch.setattr(loop, "load_dataset", load_float64)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.mark.parametrize("extra", [*E2E.values(), *OBJECTIVE_CASES.values(), *JOINED_E2E.values()],
                         ids=[*E2E.keys(), *OBJECTIVE_CASES, *JOINED_E2E])
def test_vectorized_gives_the_sequential_final_model(tiny_idx, float64_runs, extra):
    seq = experiment(tiny_idx, *extra)
    vec = experiment(tiny_idx, *extra, "engine.name=vectorized")
    sizes = {len(seq.parts[c]) for c in range(10)}
    assert len(sizes) > 3  # unequal clients
    floats = [k for k, v in seq.server.model.items() if v.is_floating_point()]
    assert all(seq.server.model[k].dtype == torch.float64 for k in floats)
    assert_close_states({k: seq.server.model[k] for k in floats}, {k: vec.server.model[k] for k in floats}, 1e-9, 1e-9)
    assert all(torch.equal(seq.server.model[k], vec.server.model[k]) for k in seq.server.model if k not in floats)
    assert (seq.server.average is None) == (vec.server.average is None)
    if seq.server.average is not None:
        assert_close_states({k: seq.server.average[k] for k in floats}, {k: vec.server.average[k] for k in floats},
                            1e-9, 1e-9)
    assert seq.server.clients.keys() == vec.server.clients.keys()
    assert_close_states(seq.server.objective, vec.server.objective, 1e-9, 1e-9)
    for a, b in zip(seq.rows, vec.rows, strict=True):
        assert (a["round"], a["samples"], a["clients"]) == (b["round"], b["samples"], b["clients"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        assert b["test_accuracy"] == a["test_accuracy"]


def test_resume_with_vectorized_equals_uninterrupted(tmp_path, tiny_idx):
    extra = ["server.algorithm=scaffold", "engine.name=vectorized"]
    straight = experiment(tiny_idx, *extra, "server.rounds=3", out=tmp_path / "straight")
    experiment(tiny_idx, *extra, "server.rounds=1", out=tmp_path / "cut")
    resumed = experiment(tiny_idx, *extra, "server.rounds=3", out=tmp_path / "cut", resume=True)
    drop = ("seconds", "train_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in straight.rows]
    for name in ("model", "objective"):
        a, b = getattr(resumed.server, name), getattr(straight.server, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_cohorts_smaller_than_the_round_give_the_same_model(tiny_idx):
    whole = experiment(tiny_idx, "engine.name=vectorized", "server.rounds=1")
    split = experiment(tiny_idx, "engine.name=vectorized", "server.rounds=1", "engine.cohort_size=3")
    floats = [k for k, v in whole.server.model.items() if v.is_floating_point()]
    assert_close_states({k: whole.server.model[k] for k in floats}, {k: split.server.model[k] for k in floats},
                        1e-5, 1e-6)


def test_failing_clients_are_dropped_like_sequential(tiny_idx):
    from fedgap.experiment.loop import sample_clients

    cfg = load_config(overrides=tiny_args(tiny_idx))
    sampled = sample_clients(cfg.seed, 1, 10, 4)
    failing = [int(c) for c in sampled[:2]]
    extra = ["server.rounds=1", f"engine.fail_clients=[{failing[0]},{failing[1]}]"]
    exps = [experiment(tiny_idx, *extra, f"engine.name={name}") for name in ("sequential", "vectorized")]
    outputs = []
    for exp in exps:
        ctx = RoundContext(1, exp.server.model)
        tasks = [ClientTask(int(c), exp.parts[c]) for c in sampled]
        with exp.engine:
            outputs.append(exp.engine.train(ctx, tasks))
    seq, vec = outputs
    assert [dataclasses.astuple(f) for f in vec.failures] == [dataclasses.astuple(f) for f in seq.failures]
    assert [f.client_id for f in vec.failures] == sorted(failing)
    assert [r.client_id for r in vec.results] == [r.client_id for r in seq.results]
    assert exps[0].rows[0]["clients_failed"] == exps[1].rows[0]["clients_failed"] == 2


def test_an_unsupported_layer_is_a_one_line_config_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 4)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(ConfigError, match=r"vectorized cannot batch the model's layer 'rnn' \(LSTM\); use engine"):
        CohortModel(Odd())


def test_device_is_honoured_and_results_come_back_on_cpu(tiny_idx):
    exp = experiment(tiny_idx, "engine.name=vectorized", "engine.device=cpu", "server.rounds=1")
    assert exp.engine.device == CPU
    assert all(v.device == CPU for v in exp.server.model.values())
