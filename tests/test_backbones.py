"""Backbones (svhn.model.backbones): the classic CNNs and timm models as feature extractors,
pretrained weights from a local file (through a fit to predict) or the hub, and timm_args."""

import pytest
import timm
import torch
import yaml
from helpers.checkpoints import write_model_checkpoint
from helpers.runs import run_module, run_predict, short_fit_args

from svhn.inference.checkpoints import load_reader
from svhn.inference.submission import read_submission
from svhn.model.backbones import TIMM_EXAMPLES, available_backbones, create_backbone
from svhn.model.training import DigitSequenceModel
from svhn.paths import CONFIGS_DIR


@pytest.mark.parametrize("name", available_backbones())
@pytest.mark.parametrize("size", [(64, 128), (40, 90)])
def test_classic_backbones_map_any_size_to_flat_features(name, size):
    model = create_backbone(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, model.num_features)


def test_every_classic_cnn_of_the_design_is_registered():
    assert set(available_backbones()) >= {"simple_cnn", "lenet5", "alexnet", "vgg", "nin",
                                          "googlenet"}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[] if name == "resnet18" else pytest.mark.slow)
    for name in TIMM_EXAMPLES
])
def test_timm_backbones_are_feature_extractors(name):
    model = create_backbone(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 128))
    assert out.shape == (1, model.num_features)


def test_local_pretrained_weights_are_loaded(tmp_path):
    reference = timm.create_model("resnet18", num_classes=1000)
    torch.nn.init.constant_(reference.conv1.weight, 0.123)
    weights = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), weights)
    model = create_backbone("resnet18", pretrained_weights=str(weights))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.num_features == 512


def test_local_pretrained_weights_train_and_predict_without_the_file(easy_data_dir, easy_fit,
                                                                     tmp_path):
    # From svhn.fit to svhn.predict: the weights file is read once, by the fit.
    reference = timm.create_model("test_resnet", num_classes=1000)
    marked = next(k for k, v in reference.state_dict().items() if v.dim() == 4)
    reference.state_dict()[marked].fill_(0.0123)
    weights = tmp_path / "test_resnet_imagenet.pth"
    torch.save(reference.state_dict(), weights)
    # lr 0: the saved backbone is exactly what was loaded.
    run = easy_fit(easy_data_dir, tmp_path / "cache", tmp_path / "runs",
                   *short_fit_args("--model.backbone", "test_resnet", "--model.lr", "0",
                                   "--model.pretrained_weights", str(weights),
                                   "--trainer.max_epochs", "1",
                                   "--trainer.limit_train_batches", "1"))
    state = torch.load(run.last, weights_only=False)["state_dict"]
    assert torch.all(state[f"reader.backbone.{marked}"] == 0.0123)

    weights.unlink()  # a checkpoint carries its weights: predict must not need the file
    out = tmp_path / "val.csv"
    assert run_predict(run, run.last, out=out) == 0
    assert len(read_submission(out)) == 81

def test_missing_or_wrong_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        create_backbone("resnet18", pretrained_weights=str(tmp_path / "none.pth"))
    wrong = tmp_path / "vgg.pth"
    torch.save(timm.create_model("resnet34").state_dict(), wrong)
    with pytest.raises(ValueError, match=f"{wrong}: cannot load as weights"):
        create_backbone("resnet18", pretrained_weights=str(wrong))


def test_unknown_backbone_and_pretrained_classic_are_errors():
    with pytest.raises(ValueError, match="unknown backbone 'resnet_nope'"):
        create_backbone("resnet_nope")
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_backbone("simple_cnn", pretrained=True)


def test_models_cli_prints_the_table(tmp_path):
    # The repository under test, whatever the working folder (tests run in a temp folder).
    done = run_module(["svhn.backbones", "--timm", "resnet18"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "simple_cnn" in out and "resnet18" in out and "(1, 512)" in out


def test_pretrained_without_network_fails_at_once_naming_the_offline_ways(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("svhn.model.backbones.socket.create_connection", unreachable)
    with pytest.raises(ValueError, match="cannot be reached") as error:
        create_backbone("resnet18", pretrained=True)
    for way in ("--model.pretrained_weights FILE", "HF_HUB_OFFLINE=1",
                "--model.pretrained false"):
        assert way in str(error.value)


def test_hub_offline_mode_skips_the_network_check(monkeypatch):
    checked = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("svhn.model.backbones.socket.create_connection",
                        lambda *a, **k: checked.append(a))
    monkeypatch.setattr("svhn.model.backbones.timm.create_model",
                        lambda *a, **k: torch.nn.Identity())  # the hub cache is not ours
    create_backbone("resnet18", pretrained=True)
    assert checked == []


def test_timm_args_reach_timm_and_a_checkpoint_rebuilds_them(tmp_path):
    backbone = create_backbone("resnet18", feature_grid=(2, 4),
                               timm_args={"drop_path_rate": 0.2})
    assert backbone.body.model.layer4[1].drop_path.drop_prob == pytest.approx(0.2)
    model = DigitSequenceModel(backbone="resnet18", feature_grid=[2, 4],
                               timm_args={"drop_path_rate": 0.2})
    reader = load_reader(write_model_checkpoint(tmp_path / "model.ckpt", model))
    assert reader.backbone.body.model.layer4[1].drop_path.drop_prob == pytest.approx(0.2)


def test_timm_args_with_a_local_weights_file_and_with_a_classic_backbone(tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    model = create_backbone("resnet18", pretrained_weights=str(weights),
                            timm_args={"drop_rate": 0.3})
    assert model.drop_rate == 0.3
    with pytest.raises(ValueError, match="'simple_cnn' is not a timm model: drop timm_args"):
        create_backbone("simple_cnn", timm_args={"drop_path_rate": 0.1})


def test_the_cpu_recipe_narrows_its_reader_the_gpu_one_does_not_and_a_checkpoint_keeps_it(
        tmp_path):
    """configs/real_cpu.yaml: the detector recipe on a ResNet18-D with half the channels (a
    third of the arithmetic per image: more epochs in the CPU budget); configs/gpu_full.yaml
    on it: the full width again."""
    narrow_recipe = yaml.safe_load((CONFIGS_DIR / "real_cpu.yaml").read_text())["model"]
    overlay = yaml.safe_load((CONFIGS_DIR / "gpu_full.yaml").read_text())["model"]
    full, narrow = (DigitSequenceModel(**args)
                    for args in ({**narrow_recipe, **overlay}, narrow_recipe))

    def size(model):
        return sum(p.numel() for p in model.reader.backbone.parameters())

    assert size(narrow) < size(full) / 3
    body = narrow.reader.backbone  # the timm ResNet itself
    assert body.conv1[0].out_channels == 16 and body.layer4[-1].conv2.out_channels == 256
    # What svhn.predict reads: rebuilt at the same width.
    reader = load_reader(write_model_checkpoint(tmp_path / "narrow.ckpt", narrow))
    assert reader.backbone.layer4[-1].conv2.out_channels == 256
    with torch.no_grad():
        logits = reader(torch.rand(2, 3, 64, 128), search=False)["logits"]
    assert logits.shape == (2, 5, 11)
