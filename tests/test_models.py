import pytest
import torch
from pydantic import ValidationError

from defect_tune.core.config import TrainConfig, load_config
from defect_tune.training.models import (
    ElCNN,
    ModelError,
    SteelCNN,
    build_model,
    parameter_counts,
    set_backbone_trainable,
)


def logits_of(model, size=64, batch=2):
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 1, size, size))


@pytest.mark.parametrize("name", ["el_cnn", "steel_cnn", "resnet18", "efficientnet_b0", "mobilenetv3_small_100",
                                  "convnext_atto"])
def test_every_backbone_takes_one_channel_and_gives_one_logit_per_class(name):
    model = build_model(load_config(None, [f"model={name}"]), num_classes=5)
    out = logits_of(model)
    assert out.shape == (2, 5)
    assert model.backbone.forward_features(torch.randn(1, 1, 64, 64)).shape[1] == model.backbone.num_features


def test_seed_cnns_have_the_documented_shapes():
    el, steel = ElCNN(), SteelCNN()
    assert [block[0].out_channels for block in el.features] == [32, 64, 128, 256]
    assert [block[0].out_channels for block in steel.features] == [32, 64, 128, 256]
    assert isinstance(steel.dense[2], torch.nn.Dropout) and steel.dense[0].out_features == 256


def test_cbam_and_mlp_head_are_inserted():
    plain = build_model(load_config(None, ["model=resnet18"]), 3)
    fancy = build_model(load_config(None, ["model=resnet18", "cbam=true", "head=mlp", "head_dropout=0.3"]), 3)
    assert type(fancy.attention).__name__ == "CbamModule"
    assert isinstance(plain.attention, torch.nn.Identity)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in fancy.head)
    assert parameter_counts(fancy)["total"] > parameter_counts(plain)["total"]
    assert logits_of(fancy).shape == (2, 3)
    assert {id(p) for p in fancy.head_parameters()} >= {id(p) for p in fancy.attention.parameters()}


def test_freezing_the_backbone_leaves_only_the_head_trainable():
    model = build_model(load_config(None, ["model=el_cnn", "cbam=true"]), 4)
    model.train()
    set_backbone_trainable(model, False)
    counts = parameter_counts(model)
    assert counts["trainable"] == sum(p.numel() for p in model.head_parameters())
    assert not model.backbone.training  # frozen batch-norm statistics
    set_backbone_trainable(model, True)
    assert parameter_counts(model)["trainable"] == counts["total"] and model.backbone.training


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError, match="resnet18"):
        build_model(load_config(None, ["model=resnet_18"]), 2)


def test_pretrained_without_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DEFECT_TUNE_WEIGHTS", raising=False)
    with pytest.raises(ModelError,
                       match=r"no ImageNet weights for resnet18: looked in .*HF_HUB_OFFLINE is set.*weights add"):
        build_model(load_config(None, ["model=resnet18", "pretrained=true"]), 2)
    with pytest.raises(ModelError, match="no published weights"):
        build_model(load_config(None, ["model=el_cnn", "pretrained=true"]), 2)


def test_pretrained_from_a_local_file(tmp_path):
    # timm's own loading code, fed a local file: the weights land in the backbone.
    source = build_model(load_config(None, ["model=resnet18"]), 2).backbone
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(load_config(None, ["model=resnet18", f"pretrained_path={tmp_path / 'resnet18.pth'}"]), 2)
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)

    el = ElCNN()
    torch.save(el.state_dict(), tmp_path / "el.pt")
    loaded = build_model(load_config(None, ["model=el_cnn", f"pretrained_path={tmp_path / 'el.pt'}"]), 2)
    assert torch.equal(loaded.backbone.features[0][0].weight, el.features[0][0].weight)
    with pytest.raises(ModelError, match="missing.pt: no such file"):
        build_model(load_config(None, ["model=el_cnn", f"pretrained_path={tmp_path / 'missing.pt'}"]), 2)


def test_input_size_resizes_stored_images_inside_the_network():
    """One `prepare` at a high resolution serves every input size a search tries."""
    sized = build_model(TrainConfig(model="el_cnn", input_size=32), 2).eval()
    plain = build_model(TrainConfig(model="el_cnn"), 2).eval()
    plain.load_state_dict(sized.state_dict())
    x = torch.randn(3, 1, 64, 48)
    small = torch.nn.functional.interpolate(x, size=(32, 24), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        assert torch.allclose(sized(x), plain(small), atol=1e-5)  # longer side to 32, aspect kept
        assert torch.allclose(sized(small), plain(small), atol=1e-6)  # already that size: untouched
    with pytest.raises(ValidationError):
        TrainConfig(input_size=4)
