"""Builder features against an independent implementation of the contract's extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms
from torchvision.models._utils import IntermediateLayerGetter

from inspection_refresh.dev.samples import render_normal
from inspection_refresh.patchcore.features import PatchFeatureExtractor, load_resnet50, patch_grid
from inspection_refresh.patchcore.images import load_rgb
from inspection_refresh.patchcore.options import BankBuildError


def contract_features(path: Path, layers: list[str], shorter: int, stride: int, seed: int) -> torch.Tensor:
    """CONTRACT.md, written out independently: torchvision transforms + IntermediateLayerGetter."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None).eval()
    getter = IntermediateLayerGetter(model, return_layers={name: name for name in layers})
    preprocess = transforms.Compose([
        transforms.Resize(shorter, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    x = preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        outputs = getter(x)
    first = outputs[layers[0]].shape[-2:]
    maps = [F.interpolate(F.normalize(outputs[n], dim=1), size=first, mode="bilinear", align_corners=False)
            for n in layers]
    feats = F.normalize(torch.cat(maps, dim=1)[:, :, ::stride, ::stride], dim=1)
    return feats[0].permute(1, 2, 0).reshape(-1, feats.shape[1])


@pytest.mark.parametrize("layers, shorter, stride, size", [
    (["layer2", "layer3"], 96, 2, (150, 110)),
    (["layer2", "layer4"], 80, 3, (90, 140)),
    (["layer3"], 64, 1, (64, 64)),
])
def test_features_equal_independent_contract_extraction(
    tmp_path: Path, layers: list[str], shorter: int, stride: int, size: tuple[int, int]
) -> None:
    path = tmp_path / "image.png"
    render_normal(1, 3, size).save(path)
    backbone, descriptor = load_resnet50("random", seed=11)
    extractor = PatchFeatureExtractor(backbone, layers, stride)

    pixels = torch.from_numpy(load_rgb(path, shorter)).permute(2, 0, 1).unsqueeze(0)
    ours = extractor(pixels)[0]
    reference = contract_features(path, layers, shorter, stride, seed=11)

    assert descriptor["name"] == "random" and descriptor["seed"] == 11
    assert ours.shape == reference.shape == (ours.shape[0], extractor.feature_dim)
    assert float((ours - reference).abs().max()) <= 1e-5
    width, height = load_rgb(path, shorter).shape[1::-1]
    assert np.prod(patch_grid(width, height, layers[0], stride)) == ours.shape[0]


def test_backbone_runs_only_to_the_deepest_layer() -> None:
    backbone, _ = load_resnet50("random")
    extractor = PatchFeatureExtractor(backbone, ["layer3", "layer2"], 2)
    assert list(extractor.stages) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    assert extractor.layers == ["layer2", "layer3"] and extractor.feature_dim == 1536


def test_checkpoint_weights_round_trip(tmp_path: Path) -> None:
    random_model, _ = load_resnet50("random", seed=4)
    state = {k: v for k, v in random_model.state_dict().items() if not k.startswith(("fc.", "layer4."))}
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)

    loaded, descriptor = load_resnet50(str(path), layers=["layer2", "layer3"])

    assert descriptor["name"] == "checkpoint" and len(descriptor["sha256"]) == 64
    x = torch.rand(1, 3, 64, 64)
    a = PatchFeatureExtractor(random_model, ["layer2", "layer3"], 2)(x)
    b = PatchFeatureExtractor(loaded, ["layer2", "layer3"], 2)(x)
    assert torch.equal(a, b)
    with pytest.raises(BankBuildError, match="does not fit torchvision resnet50"):
        load_resnet50(str(path), layers=["layer4"])  # layer4 weights are not in the file


def test_weight_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(BankBuildError, match=r"nothing\.pth does not exist.*'random'"):
        load_resnet50(str(tmp_path / "nothing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BankBuildError, match="junk.pth as a torch state_dict"):
        load_resnet50(str(tmp_path / "junk.pth"))


def test_imagenet_weights_unavailable_offline_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        lambda self, *a, **k: offline())
    with pytest.raises(BankBuildError, match=r"--weights random") as info:
        load_resnet50("imagenet")
    assert "resnet50-0676ba61.pth" in str(info.value)


def test_bank_rows_are_contract_features_and_each_image_is_extracted_once(
    tmp_path: Path, make_product, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    from inspection_refresh.patchcore.build import build_product
    from inspection_refresh.patchcore.options import BuildOptions

    ok, defect = make_product(tmp_path / "P", 3, normals=5, defects=2)
    seen = []
    original = PatchFeatureExtractor.forward

    def counting(self: PatchFeatureExtractor, images: torch.Tensor) -> torch.Tensor:
        seen.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(PatchFeatureExtractor, "forward", counting)
    # coreset 1.0 keeps every patch, so the bank must be exactly the images' contract features.
    build_product(ok, tmp_path / "bank", BuildOptions(weights="random", seed=2, shorter=96, coreset=1.0), [defect])

    assert sum(seen) == 5 + 2  # one pass per image: calibration reuses the features
    bank = torch.load(tmp_path / "bank" / "memory_bank.pt")
    reference = torch.cat([contract_features(p, ["layer2", "layer3"], 96, 2, seed=2) for p in sorted(ok.iterdir())])
    assert bank.shape == reference.shape
    match = (bank @ reference.T).argmax(dim=1)  # rows are unit vectors: the same row has dot product 1
    assert sorted(match.tolist()) == list(range(len(reference)))
    assert float((bank - reference[match]).abs().max()) <= 1e-5
