"""The sequential engine's speed switches change no number: the channels-last gradient-layout hook, the cached
state loading and the multi-tensor optimizer step give bit for bit what plain PyTorch gives."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedgap.config import load_config
from fedgap.engines.runner import prepare_model
from fedgap.fl.client import ClientHParams, ClientTask, RoundContext, load_state, local_update
from fedgap.models import build_model


def plain_channels_last_training(state, x, y, hp, steps):
    model = build_model(load_config().model).to(memory_format=torch.channels_last)
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum)  # torch's default (for-loop) step
    for s in range(steps):
        xb = x[s * 32 : (s + 1) * 32].contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), y[s * 32 : (s + 1) * 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def test_tuned_client_update_equals_plain_pytorch(mnist):
    cfg = load_config(overrides=["engine.channels_last=true"])
    torch.manual_seed(0)
    model = prepare_model(build_model(cfg.model), cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hp = ClientHParams.from_config(cfg)
    n = 160
    task = ClientTask(3, np.arange(n))
    result = local_update(model, mnist.train_x, mnist.train_y, RoundContext(1, state), task, hp)
    # The same batches in the same order, through a model without the hook and with torch's default optimizer.
    from fedgap.fl.client import epoch_orders

    order = torch.from_numpy(epoch_orders(hp, 1, 3, n)[0])
    reference = plain_channels_last_training(state, mnist.train_x[order], mnist.train_y[order], hp, n // 32)
    for k, v in result.state.items():
        assert torch.equal(v, reference[k]), k


def test_load_state_is_load_state_dict():
    cfg = load_config()
    torch.manual_seed(0)
    a, b = build_model(cfg.model), build_model(cfg.model)
    torch.manual_seed(1)
    source = build_model(cfg.model).state_dict()
    for _ in range(2):  # the second call uses the cached tensors
        load_state(a, source)
        b.load_state_dict(source)
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(RuntimeError, match="Missing key"):
        load_state(a, {k: v for k, v in source.items() if "classifier" not in k})
