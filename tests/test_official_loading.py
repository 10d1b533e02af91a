"""Official checkpoints of the families timm lacks load through the public paths (vitlab.interop.official):
``create_model(name, pretrained_path=...)``, ``create_model(name, checkpoint_path=...)`` and
``load_timm_weights``, each giving the original model's logits; vitlab's own files still load."""
import pytest
import torch

import test_crossformer
import test_cswin
import test_cvt
import test_scalablevit
import vitlab
from parity import randomize_
from vitlab.interop import load_timm_weights, to_timm_state_dict
from vitlab.models.cswin import cswin_to_official
from vitlab.models.cvt import cvt_to_official

CASES = {  # name: (small kwargs, input side, vitlab state dict -> the official layout)
    "cswin_tiny_224": (test_cswin.SMALL, 64, cswin_to_official),
    "cvt_13_224": (test_cvt.SMALL, 64, cvt_to_official),
    "scalablevit_small": (test_scalablevit.SMALL, 32, test_scalablevit.official_layout),
    "crossformer_tiny": (test_crossformer.SMALL, 32, test_crossformer.official_layout),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_official_checkpoint_loads_through_every_public_path(name, tmp_path):
    kw, side, to_official = CASES[name]
    ref = randomize_(vitlab.create_model(name, **kw), seed=5).eval()
    official = to_official(ref.state_dict())
    assert set(official) != set(ref.state_dict())  # the layouts really differ
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)
    x = torch.randn(2, 3, side, side)
    want = ref(x)
    for model in (vitlab.create_model(name, pretrained_path=str(path), **kw),
                  vitlab.create_model(name, checkpoint_path=str(path), **kw),
                  load_timm_weights(vitlab.create_model(name, **kw), official)):
        torch.testing.assert_close(model.eval()(x), want, atol=1e-5, rtol=1e-5)
    # fine-tuning to another number of classes: a new head, the backbone as released
    tuned = vitlab.create_model(name, pretrained_path=str(path), **{**kw, "num_classes": 3}).eval()
    assert tuned.pretrained_report.new and not tuned.pretrained_report.ignored or tuned.pretrained_report.ignored
    assert tuned(x).shape == (2, 3)
    torch.testing.assert_close(tuned.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        vitlab.create_model(name, checkpoint_path=str(path), pretrained_path=str(path), **kw)
    torch.save(ref.state_dict(), tmp_path / "own.pth")  # vitlab's keys pass through unchanged
    own = vitlab.create_model(name, checkpoint_path=str(tmp_path / "own.pth"), **kw).eval()
    torch.testing.assert_close(own(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="timm has no"):  # saved model files keep vitlab's keys
        to_timm_state_dict(ref)
