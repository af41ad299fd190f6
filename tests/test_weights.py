"""Where `pretrained: true` finds ImageNet weights: each source of the chain present and absent,
its order, the installed packages' renaming, bringing a file in, and the checks before training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from defect_tune.core.config import TrainConfig, load_config, recipe
from defect_tune.search.space import SpaceError, load_space
from defect_tune.training import weights as w
from defect_tune.training.models import ModelError, build_model, resolve_weights


@pytest.fixture(autouse=True)
def no_outside_sources(monkeypatch, tmp_path):
    """No weights folder, an empty Hugging Face cache, no hub: each test adds the source it tries."""
    import huggingface_hub.constants

    monkeypatch.delenv(w.ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def timm_state(model: str) -> dict:
    import timm

    return timm.create_model(model, pretrained=False).state_dict()


def stem(model) -> torch.Tensor:
    return dict(model.backbone.named_parameters())[next(iter(dict(model.backbone.named_parameters())))]


def test_a_weights_folder_comes_first_and_its_weights_land_in_the_backbone(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    state = timm_state("efficientnet_lite0")
    save_file(state, folder / "efficientnet_lite0.safetensors")
    assert w.find_weights("efficientnet_lite0").source == "package"  # the folder is not named yet
    monkeypatch.setenv(w.ENV, str(folder))
    found = w.find_weights("efficientnet_lite0")
    assert (found.source, found.path) == ("folder", folder / "efficientnet_lite0.safetensors")  # before the package
    model = build_model(TrainConfig(model="efficientnet_lite0", pretrained=True), 3)
    # timm folds the RGB stem into one channel by summing it
    assert torch.allclose(model.backbone.conv_stem.weight, state["conv_stem.weight"].sum(1, keepdim=True))
    assert w.find_weights("resnet18") is None  # the folder holds no resnet18, and nothing else does


def test_a_weights_folder_that_is_not_one_or_holds_two_files_for_a_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(w.ENV, str(tmp_path / "nowhere"))
    with pytest.raises(w.WeightsError, match="nowhere.*not a folder"):
        w.find_weights("resnet18")
    monkeypatch.setenv(w.ENV, str(tmp_path))
    (tmp_path / "resnet18.pth").write_bytes(b"x")
    (tmp_path / "resnet18.safetensors").write_bytes(b"x")
    with pytest.raises(w.WeightsError, match="resnet18.safetensors, resnet18.pth all claim resnet18"):
        w.find_weights("resnet18")


def test_the_hugging_face_cache_is_read_without_the_network(tmp_path):
    assert w.find_weights("resnet18") is None
    repo = tmp_path / "hf-cache" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    state = timm_state("resnet18")
    save_file(state, repo / "snapshots" / "abc123" / "model.safetensors")
    found = w.find_weights("resnet18")
    assert found.source == "hf-cache" and found.path.name == "model.safetensors"
    model = build_model(TrainConfig(model="resnet18", pretrained=True), 2)
    assert torch.allclose(model.backbone.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_an_installed_package_is_renamed_onto_timm_in_order_with_every_shape_checked(monkeypatch):
    found = w.find_weights("efficientnet_lite0")
    assert found.source == "package" and found.path.name == "efficientnet-lite0-57934424.pth"
    theirs = torch.load(found.path, map_location="cpu", weights_only=True)
    model = build_model(TrainConfig(model="efficientnet_lite0", pretrained=True), 3)
    assert torch.allclose(model.backbone.conv_stem.weight, theirs["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(model.backbone.bn2.running_var, theirs["_bn1.running_var"])  # the last BN, by position
    for model_name in ("efficientnet_lite1", "efficientnet_lite2"):  # the other two packages fit as well
        assert len(w.load_state(w.find_weights(model_name))) == len(timm_state(model_name))
    with pytest.raises(w.WeightsError, match="the package's weights hold 296 tensors, timm's model"):
        w._renamed("efficientnet_lite1", theirs)  # lite0's tensors onto lite1
    reshaped = dict(theirs)
    reshaped["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(w.WeightsError, match=r"_conv_stem.weight \(16, 3, 3, 3\) does not fit timm's conv_stem.weight"):
        w._renamed("efficientnet_lite0", reshaped)
    monkeypatch.setitem(w.PACKAGES, "efficientnet_lite0", ("no_such_weights_package", "models/x.pth"))
    assert w.find_weights("efficientnet_lite0") is None
    assert "no_such_weights_package (not installed" in w.no_weights("efficientnet_lite0")


def test_the_hub_is_asked_last_and_its_download_is_used(tmp_path, monkeypatch):
    import huggingface_hub

    assert w.find_weights("resnet18") is None
    assert "the hub (HF_HUB_OFFLINE is set)" in w.no_weights("resnet18")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    downloaded = tmp_path / "downloaded.safetensors"
    save_file(timm_state("resnet18"), downloaded)
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name: asked.append((repo, name)) or str(downloaded))
    found = w.find_weights("resnet18")
    assert (found.source, found.path, asked) == ("hub", downloaded, [("timm/resnet18.a1_in1k", "model.safetensors")])
    assert w.find_weights("resnet18", hub=False) is None and len(asked) == 1
    assert w.find_weights("efficientnet_lite0").source == "package" and len(asked) == 1  # a local source: no hub


def test_weights_add_checks_the_file_against_the_model_before_copying(tmp_path):
    good, other = tmp_path / "mine.safetensors", tmp_path / "other.safetensors"
    save_file(timm_state("resnet18"), good)
    save_file(timm_state("resnet34"), other)
    folder = tmp_path / "weights"
    with pytest.raises(w.WeightsError,
                       match=r"other.safetensors: not weights for resnet18: stray \d+ tensor\(s\), e.g. layer1.2"):
        w.add_weights(other, "resnet18", folder)
    assert not folder.exists()
    target = w.add_weights(good, "resnet18", folder)
    assert target == folder / "resnet18.safetensors" and w.find_weights("resnet18", folder).path == target


def test_pretrained_weights_are_resolved_before_training_and_say_where_from(tmp_path):
    assert resolve_weights(TrainConfig()) is None  # the plain recipe: from scratch
    transfer = load_config(None, base=recipe("transfer"))
    assert (transfer.model, transfer.pretrained) == ("efficientnet_lite0", True)
    assert "efficientnet_lite0: ImageNet weights from an installed package" in resolve_weights(transfer).describe()
    with pytest.raises(ModelError, match="no published weights"):
        resolve_weights(TrainConfig(model="el_cnn", pretrained=True))
    fifo = tmp_path / "fifo"
    import os

    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="fifo: not a regular file"):  # reading it would block forever
        resolve_weights(TrainConfig(model="el_cnn", pretrained_path=str(fifo)))


def test_a_space_whose_backbones_cannot_build_is_refused_before_the_sweep(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "num_samples: 4\nmax_epochs: 2\nfixed: {pretrained: true}\n"
        "params:\n  model: {choice: [efficientnet_lite0, resnet18, steel_cnn]}\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
    )
    with pytest.raises(SpaceError) as refused:
        load_space(space).check_weights()
    message = str(refused.value)
    assert ("2 backbone(s)" in message and "'resnet18': no ImageNet weights" in message
            and "'steel_cnn' has no published" in message)
    assert "efficientnet_lite0" not in message  # its package is installed
    # Pretrained only where the space says so: the seeds' CNN trains from scratch, lite0 has its weights.
    space.write_text(
        "num_samples: 4\nmax_epochs: 2\n"
        "params:\n  model: {choice: [efficientnet_lite0, steel_cnn]}\n"
        "  pretrained: {choice: [true], when: {model: efficientnet_lite0}}\n"
        "points_to_evaluate:\n  - name: transfer\n"
    )
    checked = load_space(space)
    assert [line.split(":")[0] for line in checked.check_weights()] == ["efficientnet_lite0"]
    assert checked.points == (("transfer", {"model": "efficientnet_lite0", "pretrained": True}),)


@pytest.mark.parametrize("name", ["quick", "defects", "el_solar"])
def test_the_bundled_spaces_search_pretrained_backbones_and_measure_the_transfer_recipe_first(name):
    from defect_tune.search.space import resolve_space

    space = load_space(resolve_space(name))
    assert space.points[0][0] == "transfer" and space.points[0][1]["pretrained"] is True
    assert space.check_weights()  # buildable here, from the installed packages


def test_input_sizes_above_the_prepared_size_are_left_out_unless_asked_for(tmp_path):
    from defect_tune.search.space import resolve_space

    space = load_space(resolve_space("defects"))
    meta = {"image": {"height": 100, "width": 100}}
    fitted, note = space.for_data(meta)
    assert dict((p.name, p.values) for p in fitted.params)["input_size"] == (None, 96)
    assert note.startswith("input_size [128, 224] left out") and "--upsample" in note
    assert space.for_data(meta, upsample=True) == (space, None)
    assert space.for_data({"image": {"height": 256, "width": 224}}) == (space, None)


def test_train_auto_recipe_falls_back_to_scratch_with_one_line_when_no_weights(monkeypatch):
    from defect_tune import cli

    assert cli._choose_recipe("auto", None, [])[0] == "transfer"
    assert cli._choose_recipe("auto", None, ["model=el_cnn"]) == ("scratch", None)  # the keys name the model
    assert cli._choose_recipe("scratch", None, []) == ("scratch", None)
    monkeypatch.setitem(w.PACKAGES, "efficientnet_lite0", ("no_such_weights_package", "models/x.pth"))
    chosen, note = cli._choose_recipe("auto", None, [])
    assert chosen == "scratch" and note.startswith("recipe scratch (the plain recipe, from scratch): "
                                                   "no ImageNet weights")
