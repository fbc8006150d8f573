import numpy as np
import pytest
import torch

from conftest import asset
import optimizer
from optimizer import SCHEDULES, AdamW, decay_groups, lr_factor


def train_linear(opt_class, **kwargs) -> torch.Tensor:
    """The assignment's optimizer test: a Linear(3, 2) fitted for 1000 steps."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, bias=False)
    opt = opt_class(model.parameters(), lr=1e-3, weight_decay=1e-4, **kwargs)
    for _ in range(1000):
        opt.zero_grad()
        x = torch.FloatTensor(rng.uniform(size=[model.in_features]))
        y = torch.Tensor([x[0] + x[1], -x[2]])
        loss = ((y - model(x)) ** 2).sum()
        loss.backward()
        opt.step()
    return model.weight.detach()


def test_reproduces_assignment_reference():
    ref = torch.tensor(np.load(asset("optimizer_test.npy")))
    assert torch.allclose(ref, train_linear(AdamW, correct_bias=True), atol=1e-5, rtol=1e-3)


def test_matches_torch_adamw():
    ours = train_linear(AdamW)
    theirs = train_linear(torch.optim.AdamW, eps=1e-6)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_matches_torch_adamw_on_a_network_with_frozen_parameters():
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    ours, theirs = make(), make()
    theirs.load_state_dict(ours.state_dict())
    for net in (ours, theirs):
        net[0].bias.requires_grad = False
    # Two known differences of the assignment's variant are kept out of this comparison: it decays after
    # the Adam update (torch before) and adds eps before the bias correction (torch after).
    opt_ours = AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2, eps=1e-12)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2,
                                   weight_decay=0.0, eps=1e-12)
    for _ in range(50):
        x = torch.randn(5, 8)
        for net, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_update_goes_a_chunk_at_a_time_and_is_the_same_as_all_at_once(monkeypatch):
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 40), torch.nn.Linear(40, 3))
    whole, chunked = make(), make()
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(5, 8)
    temporaries = []
    sqrt = torch._foreach_sqrt
    monkeypatch.setattr(torch, "_foreach_sqrt", lambda v: temporaries.append(sum(t.numel() for t in v)) or sqrt(v))
    for net, chunk in ((whole, 10 ** 6), (chunked, 700)):
        monkeypatch.setattr(optimizer, "UPDATE_CHUNK", chunk)
        opt = AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    sizes = [p.numel() for p in whole.parameters()]  # 128, 16, 640, 40, 120, 3
    assert temporaries[:3] == [sum(sizes)] * 3 and temporaries[3:7] == [128 + 16, 640 + 40, 120 + 3, 128 + 16]
    for a, b in zip(whole.parameters(), chunked.parameters()):
        assert torch.equal(a, b)


def test_without_bias_correction_the_first_step_is_small():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = AdamW([p], lr=0.1, correct_bias=False)
    p.grad = torch.ones(1)
    opt.step()
    # m = 0.1, v = 0.001 -> step = 0.1 * 0.1 / sqrt(0.001), not the bias-corrected 0.1
    assert torch.allclose(p, torch.tensor([-0.1 * 0.1 / (0.001 ** 0.5 + 1e-6)]))


def test_weight_decay_is_decoupled_and_scaled_by_lr():
    p = torch.nn.Parameter(torch.full((3,), 2.0))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        p.grad = torch.zeros(3)  # no gradient: only the decay moves p
        opt.step()
    assert torch.allclose(p, torch.full((3,), 2.0 * (1 - 0.1 * 0.5) ** 3))


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(lr=-1.0), dict(betas=(1.0, 0.999)),
                                    dict(betas=(0.9, -0.1)), dict(eps=0.0), dict(weight_decay=-0.1)])
def test_bad_hyperparameters_are_refused(kwargs):
    with pytest.raises(ValueError, match="AdamW"):
        AdamW([torch.nn.Parameter(torch.zeros(1))], **kwargs)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_are_transformers_schedules(schedule, warmup):
    import transformers

    make = {"constant": lambda opt: transformers.get_constant_schedule_with_warmup(opt, warmup),
            "linear": lambda opt: transformers.get_linear_schedule_with_warmup(opt, warmup, 10),
            "cosine": lambda opt: transformers.get_cosine_schedule_with_warmup(opt, warmup, 10)}[schedule]
    param = torch.nn.Parameter(torch.zeros(1))
    theirs = make(torch.optim.SGD([param], lr=0.5))
    ours = torch.optim.lr_scheduler.LambdaLR(AdamW([param], lr=0.5), lr_factor(schedule, warmup, 10))
    for _ in range(10):
        assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr(), abs=1e-12)
        ours.optimizer.step()
        theirs.optimizer.step()
        ours.step()
        theirs.step()


def test_weight_decay_spares_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = decay_groups(model.named_parameters(), 0.1)
    assert [[tuple(p.shape) for p in g["params"]] for g in groups] == [[(4, 3)], [(4,), (4,), (4,)]]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert len(decay_groups(model.named_parameters(), 0.0)) == 1
