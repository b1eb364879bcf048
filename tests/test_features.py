"""Feature extractors through torch-fidelity: the domain CNN and the inception-v3-compat path."""
import numpy as np
import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset

from models.evaluation.features import (DomainNet, load_domain_classifier, register_domain_extractor, save_domain_classifier,
                             train_domain_classifier)
from pipeline.sources import get_source
from pipeline.config import DataConfig


class Images(Dataset):
    """uint8 (N, C, H, W) tensors as torch-fidelity reads them."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@pytest.fixture(scope="module")
def digits_domain(tmp_path_factory):
    src = get_source("digits")(DataConfig(dataset="digits"))
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    train_x, test_x = to_t(src.train_images), to_t(src.test_images)
    net, acc, per_class = train_domain_classifier(train_x, torch.from_numpy(src.train_labels), test_x,
                                                  torch.from_numpy(src.test_labels), epochs=8, batch_size=64)
    path = tmp_path_factory.mktemp("domain") / "domain.pt"
    save_domain_classifier(net, path, test_accuracy=acc)
    return path, acc, per_class, train_x, test_x


def test_domain_classifier_learns_digits(digits_domain):
    path, acc, per_class, _, _ = digits_domain
    assert acc > 0.85 and min(per_class) > 0.5
    net, meta = load_domain_classifier(path)
    assert meta["test_accuracy"] == acc and isinstance(net, DomainNet)
    assert 0.25e6 < sum(p.numel() for p in DomainNet(1, 10).parameters()) < 0.33e6


def test_domain_metrics_through_torch_fidelity(digits_domain):
    path, _, _, train_x, test_x = digits_domain
    name = register_domain_extractor()
    kw = dict(feature_extractor=name, feature_extractor_weights_path=str(path), cuda=False, verbose=False,
              fid=True, kid=True, prc=True, isc=True, kid_subset_size=100, save_cpu_ram=True)
    same = torch_fidelity.calculate_metrics(input1=Images(test_x), input2=Images(test_x), **kw)
    assert same["frechet_inception_distance"] == pytest.approx(0.0, abs=1e-3)
    assert same["precision"] == pytest.approx(1.0) and same["recall"] == pytest.approx(1.0)
    assert same["inception_score_mean"] > 3.0  # a confident classifier over 10 balanced classes
    g = torch.Generator().manual_seed(0)
    fids = []
    for scale in (10, 40, 90):
        noisy = (test_x.float() + scale * torch.randn(test_x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        out = torch_fidelity.calculate_metrics(input1=Images(noisy), input2=Images(train_x), **kw)
        fids.append(out["frechet_inception_distance"])
    assert fids == sorted(fids) and fids[0] > 0


def test_inception_path_runs_on_a_weights_file_written_here(tmp_path):
    """No real weights offline: a freshly initialised network, saved in the expected format."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Fresh(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    weights = tmp_path / "inception.pt"
    torch.save(Fresh("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(), weights)
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8))
    out = torch_fidelity.calculate_metrics(input1=Images(imgs), input2=Images(imgs.flip(0)), fid=True, cuda=False,
                                           verbose=False, feature_extractor="inception-v3-compat",
                                           feature_extractor_weights_path=str(weights), save_cpu_ram=True)
    assert np.isfinite(out["frechet_inception_distance"])
