"""Every registered model: a training step at 64 px, batch 2, channels_last, every parameter used."""

import gc

import pytest
import torch

from rkan_dist.models import create_model, list_models

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_channels_last_uses_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    logits = model(images)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    if name.startswith("rkan_"):
        kan = [p for n, p in model.named_parameters() if n.endswith("poly_weight")]
        assert len(kan) == 2 and all(p.grad.abs().sum() > 0 for p in kan)
    del model, logits
    gc.collect()
