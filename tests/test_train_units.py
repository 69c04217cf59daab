"""Trainer building blocks in-process: registry, weights, freezing, augmentation, class weights."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from xray.common.errors import XrayError
from xray.train.augment import AugmentConfig, augment
from xray.train.data import class_weights
from xray.train.models import REGISTRY, backbone_parameters_in_blocks, build_model, get_model_def
from xray.train.phases import param_groups, set_train_mode, set_trainable, warmup_cosine


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_backbone_parameter_belongs_to_a_block(name):
    model = build_model(name, 4, pretrained=False)
    unowned = [n for n, _, block in backbone_parameters_in_blocks(model) if block is None]
    assert unowned == []
    spec = get_model_def(name).spec
    out = model(torch.randn(2, spec.channels, 64, 64))
    assert out.shape == (2, 4)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_offline_torchvision_weights_fail_with_a_clear_message(name, monkeypatch, tmp_path):
    import torchvision.models._api as api

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(XrayError) as e:
        build_model(name, 3, pretrained=True)
    assert "--weights" in str(e.value) and "efficientnet_lite0" in str(e.value)


def test_local_weights_file_loads_into_the_backbone(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 3, weights=str(path))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(XrayError, match="missing or mis-shaped"):
        build_model("resnet18", 3, weights=str(tmp_path / "other.pth"))


def test_unknown_model():
    with pytest.raises(XrayError, match="unknown model"):
        get_model_def("vgg16")


def test_phase_freezing_and_batchnorm_modes():
    model = build_model("efficientnet_b0", 3, pretrained=False)
    unfrozen = set_trainable(model, "A", 3)
    assert unfrozen == set()
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    set_train_mode(model, unfrozen)
    assert model.head.training and not any(m.training for m in model.backbone.modules())

    unfrozen = set_trainable(model, "B", 3)
    assert unfrozen == {6, 7, 8}
    bn = torch.nn.modules.batchnorm._BatchNorm
    for frozen_stats in (False, True):
        set_train_mode(model, unfrozen, bn_stats_frozen=frozen_stats)
        for i, block in enumerate(model.blocks):
            for m in block:
                assert all(p.requires_grad == (i in unfrozen) for p in m.parameters())
                for sub in m.modules():
                    expected = i in unfrozen and not (frozen_stats and isinstance(sub, bn))
                    assert sub.training == expected, (i, type(sub).__name__, frozen_stats)
    assert set_trainable(model, "B", "all") == set(range(9))


def test_discriminative_param_groups_and_schedule():
    model = build_model("resnet18", 3, pretrained=False)
    set_trainable(model, "B", 1)
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 1e-4, 0.05)}
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == 1e-4
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.05
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable
    opt = torch.optim.AdamW(list(groups.values()))
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] <= lrs[2] and lrs[2] > lrs[5] > lrs[9]


def test_augmentation_is_a_function_of_its_generator():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 100), dtype=np.uint8), "L")
    spec = get_model_def("efficientnet_lite0").spec.with_size(64)
    cfg = AugmentConfig()
    a = augment(img, spec, cfg, np.random.default_rng(1))
    b = augment(img, spec, cfg, np.random.default_rng(1))
    c = augment(img, spec, cfg, np.random.default_rng(2))
    assert a.size == (spec.resize_size, spec.resize_size) and a.mode == "L"
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


def test_class_weights_are_inverse_frequency():
    w = class_weights([("x", 0)] * 6 + [("y", 1)] * 3 + [("z", 2)] * 1, 3)
    assert torch.allclose(w, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    assert torch.allclose(class_weights([("x", 0), ("y", 1)], 2), torch.ones(2))
