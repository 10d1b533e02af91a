"""``block_mixers``: a hybrid ViT whose blocks use different token mixers (e.g. linear attention early, softmax
late), built from the same parts, and a full-attention ViT's weights carried over to it."""
import pytest
import torch

from vitlab.layers import TokenLayout
from vitlab.models.vit import VisionTransformer

KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
HYBRID = {0: dict(core="focused_linear"), -1: dict(mixer="cosine", mixer_kwargs=dict(tau=10.0))}


def _randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_each_block_gets_its_mixer_and_the_rest_the_models():
    model = VisionTransformer(**KW, modifiers=("talking_heads",),
                              block_mixers={**HYBRID, 0: dict(core="focused_linear", modifiers=())})
    cores = [type(b.attn.core).__name__ for b in model.blocks]
    assert cores == ["FocusedLinearCore", "SoftmaxCore", "CosineCore"]
    # fields not given are the model's: block 2 keeps the talking heads; block 0 cannot (focused linear attention
    # never forms the matrix) and is refused, so the override must name its own modifiers there
    assert [type(m).__name__ for m in model.blocks[2].attn.modifiers] == ["TalkingHeads"]
    with pytest.raises(ValueError, match="focused_linear.*talking_heads"):
        VisionTransformer(**KW, modifiers=("talking_heads",), block_mixers={0: dict(core="focused_linear")})


def test_full_attention_weights_carry_over_and_untouched_blocks_compute_the_same():
    full = _randomised(VisionTransformer(**KW))
    hybrid = VisionTransformer(**KW, block_mixers={0: dict(core="focused_linear")}).eval()
    report = hybrid.load_state_dict(full.state_dict(), strict=False)
    all_linear = VisionTransformer(**KW, core="focused_linear")
    new_in_block0 = sorted(k for k in all_linear.state_dict() if k.startswith("blocks.0.")
                           and k not in full.state_dict())
    assert sorted(report.missing_keys) == new_in_block0 and not report.unexpected_keys
    x = torch.randn(2, 1 + 16, 32)
    layout = TokenLayout((4, 4), 1)
    with torch.no_grad():
        for i in (1, 2):  # the softmax blocks are the full model's, weight for weight
            torch.testing.assert_close(hybrid.blocks[i](x, layout), full.blocks[i](x, layout), rtol=0, atol=0)
        assert (hybrid.blocks[0](x, layout) - full.blocks[0](x, layout)).abs().max() > 1e-3


def test_an_override_equal_to_the_model_changes_nothing():
    plain = _randomised(VisionTransformer(**KW))
    same = VisionTransformer(**KW, block_mixers={1: dict(core="softmax"), -1: dict(mixer="softmax")}).eval()
    same.load_state_dict(plain.state_dict())
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same(img), plain(img), rtol=0, atol=0)


def test_hybrid_trains_every_parameter():
    model = VisionTransformer(**KW, block_mixers=HYBRID)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("bad,match", [
    ({3: dict(core="softmax")}, "block_mixers index 3 is out of range for depth 3"),
    ({0: dict(cores="softmax")}, "unknown keyword argument 'cores'"),
    ({0: dict(mixer="nope")}, "nope"),
])
def test_bad_block_mixers_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        VisionTransformer(**KW, block_mixers=bad)


def test_a_linear_block_is_checked_against_token_dropping():
    with pytest.raises(ValueError, match="focused_linear"):
        VisionTransformer(**KW, patch_drop_rate=0.5, block_mixers={1: dict(core="focused_linear")})


def test_fine_tuning_loads_a_full_attention_checkpoint_into_a_hybrid(tmp_path):
    """``load_pretrained`` (``vitlab train --pretrained``): the parts the file's blocks lack start from their init and
    are reported as new; a block the file lacks entirely is still an error."""
    from vitlab.errors import UserError
    from vitlab.interop.checkpoint import load_pretrained

    full = _randomised(VisionTransformer(**KW))
    path = tmp_path / "full.pt"
    torch.save(full.state_dict(), path)
    hybrid = VisionTransformer(**KW, block_mixers={0: dict(core="focused_linear")}, branch_scale="layerscale")
    rep = load_pretrained(hybrid, str(path))
    own = set(hybrid.state_dict())
    assert sorted(rep.new) == sorted(own - set(full.state_dict()))  # DWC, scale, pos_enc of block 0; ls gammas
    assert any(".ls1." in k for k in rep.new) and any("blocks.0.attn.dwc" in k for k in rep.new)
    torch.testing.assert_close(hybrid.blocks[1].attn.qkv.weight, full.blocks[1].attn.qkv.weight, rtol=0, atol=0)
    with pytest.raises(UserError, match="missing blocks.3"):
        load_pretrained(VisionTransformer(**dict(KW, depth=4)), str(path))
