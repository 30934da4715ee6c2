"""Builder features against an independent implementation of the service's query path.

``service_features`` below is written from the contract's step list alone -- OpenCV decoding and
resizing, torchvision ``resnet50`` with forward hooks, upsample then normalise -- and shares no
code with the builder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from inspection_refresh.dev.samples import render_normal
from inspection_refresh.patchcore.features import PatchFeatureExtractor, load_resnet50, patch_grid
from inspection_refresh.patchcore.images import load_rgb
from inspection_refresh.patchcore.options import BankBuildError


def service_features(path: Path, model: torch.nn.Module, layers: list[str], shorter: int,
                     stride: int) -> torch.Tensor:
    """CONTRACT.md's query path, steps 1-6, for one image: ``[rows * cols, D]``."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # 1. 8-bit BGR, EXIF applied, grey/16-bit/alpha handled
    h, w = bgr.shape[:2]
    if min(h, w) != shorter:  # 2. short side -> shorter, long side truncated, INTER_AREA
        if h < w:
            new_w, new_h = int(w * shorter / h), shorter
        else:
            new_w, new_h = shorter, int(h * shorter / w)
        bgr = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0  # 3.
    rgb = (rgb - np.array([0.485, 0.456, 0.406], dtype=np.float32)) / np.array([0.229, 0.224, 0.225],
                                                                               dtype=np.float32)
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    outputs: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
             for name in layers]
    try:
        with torch.no_grad():
            model(x)  # 4. the whole network; the hooks keep the listed layers' outputs
    finally:
        for hook in hooks:
            hook.remove()
    first = outputs[layers[0]].shape[-2:]
    maps = []
    for name in layers:  # 5. upsample to the first layer's grid, then normalise over channels
        fmap = outputs[name]
        if fmap.shape[-2:] != first:
            fmap = F.interpolate(fmap, size=first, mode="bilinear", align_corners=False)
        maps.append(F.normalize(fmap, dim=1))
    feats = torch.cat(maps, dim=1)[0, :, ::stride, ::stride]  # 6. every stride-th row/column, row-major
    feats = feats.permute(1, 2, 0).reshape(-1, feats.shape[0])
    return F.normalize(feats, dim=1)


def random_resnet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet50(weights=None).eval()


def write_awkward_images(directory: Path, shorter: int) -> list[Path]:
    """The formats the service meets: EXIF rotation, grey, 16-bit, alpha, portrait, landscape, exact size."""
    directory.mkdir(parents=True, exist_ok=True)
    rotated = render_normal(0, 1, (160, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotate 90 degrees clockwise)
    rotated.save(directory / "exif_rotated.jpg", quality=90, exif=exif)
    render_normal(1, 2, (130, 100)).convert("L").save(directory / "grey.png")
    sixteen = np.asarray(render_normal(2, 3, (100, 140)), dtype=np.uint16) * 257 + 11
    cv2.imwrite(str(directory / "sixteen_bit.png"), cv2.cvtColor(sixteen, cv2.COLOR_RGB2BGR))
    rgba = render_normal(3, 4, (150, 110)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((150, 110)))
    rgba.save(directory / "alpha.png")
    render_normal(0, 5, (90, 150)).save(directory / "portrait.jpg", quality=90)
    render_normal(1, 6, (200, 120)).save(directory / "landscape.jpg", quality=90)
    render_normal(2, 7, (shorter, 140)).save(directory / "exact_short_side.png")
    return sorted(directory.iterdir())


def test_awkward_images_decode_as_opencv_does(tmp_path: Path) -> None:
    paths = {p.stem: p for p in write_awkward_images(tmp_path, 96)}
    assert cv2.imread(str(paths["sixteen_bit"]), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert cv2.imread(str(paths["alpha"]), cv2.IMREAD_UNCHANGED).shape[2] == 4
    assert load_rgb(paths["exif_rotated"], 96).shape == (128, 96, 3)  # portrait after the EXIF rotation
    assert load_rgb(paths["landscape"], 96).shape == (96, 160, 3)  # 200 * 96 / 120 = 160
    assert load_rgb(paths["portrait"], 96).shape == (160, 96, 3)  # 150 * 96 / 90 = 160
    exact = load_rgb(paths["exact_short_side"], 96)
    original = np.asarray(Image.open(paths["exact_short_side"]).convert("RGB"), dtype=np.float32) / 255
    assert np.array_equal(exact, original)  # short side already 96: not resampled at all


def test_bank_rows_equal_the_service_query_path_features(tmp_path: Path) -> None:
    from inspection_refresh.patchcore.build import build_product
    from inspection_refresh.patchcore.options import BuildOptions

    shorter, layers, stride = 96, ["layer2", "layer3"], 2
    images = write_awkward_images(tmp_path / "ok", shorter)
    model = random_resnet(21)
    checkpoint = tmp_path / "resnet50.pth"
    torch.save(model.state_dict(), checkpoint)
    # coreset 1.0 keeps every patch: the bank must hold exactly the service's features of every image.
    summary = build_product(tmp_path / "ok", tmp_path / "bank",
                            BuildOptions(weights=str(checkpoint), shorter=shorter, stride=stride, layers=layers,
                                         coreset=1.0))

    bank = torch.load(tmp_path / "bank" / "memory_bank.pt")
    reference = torch.cat([service_features(p, model, layers, shorter, stride) for p in images])
    assert summary["num_images"] == len(images) == 7 and bank.shape == reference.shape
    match = (reference @ bank.T).argmax(dim=1)  # unit vectors: the same row has dot product 1
    assert sorted(match.tolist()) == list(range(len(bank)))
    assert float((bank[match] - reference).abs().max()) <= 1e-5


@pytest.mark.parametrize("layers, shorter, stride, size", [
    (["layer2", "layer3"], 96, 2, (150, 110)),
    (["layer2", "layer3", "layer4"], 80, 3, (90, 140)),
    (["layer3"], 64, 1, (64, 64)),
])
def test_extractor_equals_the_query_path_for_each_layer_choice(
    tmp_path: Path, layers: list[str], shorter: int, stride: int, size: tuple[int, int]
) -> None:
    path = tmp_path / "image.png"
    render_normal(1, 3, size).save(path)
    backbone, descriptor = load_resnet50("random", seed=11)
    extractor = PatchFeatureExtractor(backbone, layers, stride)

    pixels = torch.from_numpy(load_rgb(path, shorter)).permute(2, 0, 1).unsqueeze(0)
    ours = extractor(pixels)[0]
    reference = service_features(path, random_resnet(11), layers, shorter, stride)

    assert descriptor["name"] == "random" and descriptor["seed"] == 11 and len(descriptor["sha256"]) == 64
    assert ours.shape == reference.shape == (ours.shape[0], extractor.feature_dim)
    assert float((ours - reference).abs().max()) <= 1e-5
    width, height = load_rgb(path, shorter).shape[1::-1]
    assert np.prod(patch_grid(width, height, layers[0], stride)) == ours.shape[0]


def test_normalising_before_upsampling_would_give_other_vectors(tmp_path: Path) -> None:
    """Guards the order: the test above would not notice if both orders agreed on these images."""
    path = tmp_path / "image.png"
    render_normal(2, 1, (120, 96)).save(path)
    model = random_resnet(5)
    right = service_features(path, model, ["layer2", "layer3"], 96, 1)
    x = torch.from_numpy(load_rgb(path, 96)).permute(2, 0, 1).unsqueeze(0)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        l2 = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
        l3 = model.layer3(l2)
    wrong = torch.cat([F.normalize(l2, dim=1), F.interpolate(F.normalize(l3, dim=1), size=l2.shape[-2:],
                                                            mode="bilinear", align_corners=False)], dim=1)
    wrong = F.normalize(wrong[0].permute(1, 2, 0).reshape(-1, wrong.shape[1]), dim=1)
    assert float((right - wrong).abs().max()) > 1e-3


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


@pytest.fixture()
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, so nothing from this machine's cache leaks in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_imagenet_weights_are_torchvision_v2(torch_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    v2 = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    v1 = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    stand_in = random_resnet(8)
    torch_home.mkdir(parents=True)
    # Offline: a stand-in state_dict at the path torchvision keeps IMAGENET1K_V2 under. A file at
    # V1's name alone is never picked up (see the next test).
    torch.save(stand_in.state_dict(), torch_home / Path(v2.url).name)

    with caplog.at_level(logging.WARNING):
        model, descriptor = load_resnet50("imagenet")

    assert Path(v2.url).name == "resnet50-11ad3fa6.pth" != Path(v1.url).name
    assert descriptor["torchvision_weights"] == "ResNet50_Weights.IMAGENET1K_V2"
    assert descriptor["file"] == Path(v2.url).name and descriptor["url"] == v2.url
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), stand_in.state_dict().values()))
    assert descriptor["official_file"] is False and "not the official IMAGENET1K_V2 file" in caplog.text


def test_imagenet_weights_unavailable_offline_names_the_v2_file(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch_home.mkdir(parents=True)
    torch.save(random_resnet(1).state_dict(), torch_home / "resnet50-0676ba61.pth")  # V1's file: not used

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict",
                        lambda self, *a, **k: offline())
    with pytest.raises(BankBuildError, match=r"--weights random") as info:
        load_resnet50("imagenet")
    assert "resnet50-11ad3fa6.pth" in str(info.value) and "IMAGENET1K_V2" in str(info.value)


def test_bank_config_records_the_extraction(tmp_path: Path, make_product) -> None:  # noqa: ANN001
    from inspection_refresh.patchcore.build import build_product
    from inspection_refresh.patchcore.options import EXTRACTOR_VERSION, BuildOptions

    ok, _ = make_product(tmp_path / "P", 1, normals=3)
    build_product(ok, tmp_path / "bank", BuildOptions(weights="random", shorter=64, seed=3))
    config = json.loads((tmp_path / "bank" / "bank_config.json").read_text())
    assert config["decoder"] == "cv2.imread(path, cv2.IMREAD_COLOR)" and config["opencv_version"] == cv2.__version__
    assert config["extractor_version"] == EXTRACTOR_VERSION and "INTER_AREA" in config["input"]["resize"]
    assert config["feature_pooling"].startswith("each layer upsampled") and "then L2-normalised" in config[
        "feature_pooling"]
    assert config["weights"]["name"] == "random" and config["weights"]["sha256"] == load_resnet50(
        "random", seed=3)[1]["sha256"]
