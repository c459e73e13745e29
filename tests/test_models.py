"""Backbone/head layout, freezing and parameter counts."""
import pytest
import torch
import torch.nn.functional as F

from fine_tune.learn.models import build_model, count_params


@pytest.mark.parametrize("k,expected", [(0, 109_386), (1, 109_386 - (784 * 128 + 128)), (2, 64 * 10 + 10)])
def test_simplenet_trainable_counts(k, expected):
    assert count_params(build_model("simplenet", 10, frozen_layers=k)) == expected


def test_cnn_is_under_100k_parameters():
    assert count_params(build_model("cnn", 10), trainable_only=False) < 100_000


@pytest.mark.parametrize("arch", ["simplenet", "cnn"])
def test_frozen_layers_do_not_change_after_a_step(arch):
    torch.manual_seed(0)
    model = build_model(arch, 5, head_size=16, frozen_layers=2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)  # pure unit test: no dataset involved
    y = torch.randint(0, 5, (32,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        frozen = k.startswith("backbone.0.") or k.startswith("backbone.1.")
        assert changed != frozen, k  # includes BatchNorm running stats: frozen layers keep theirs


def test_frozen_layers_stay_in_eval_mode():
    model = build_model("cnn", 10, frozen_layers=1).train()
    assert not model.backbone[0].training and model.backbone[1].training


@pytest.mark.parametrize("h", [0, 32])
def test_head_shapes_and_sizes(h):
    model = build_model("simplenet", 3, head_size=h, frozen_layers=2)
    assert model(torch.zeros(4, 1, 28, 28, dtype=torch.uint8)).shape == (4, 3)
    expected = 64 * 3 + 3 if h == 0 else 64 * h + h + h * 3 + 3
    assert count_params(model) == expected


def test_freezing_beyond_the_backbone_is_refused():
    with pytest.raises(ValueError, match="backbone has 2 layers"):
        build_model("simplenet", 10, frozen_layers=3)
