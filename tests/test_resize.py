"""One place fits size-dependent tensors of a checkpoint to a model of another size
(``vitlab.models.resize``): learned position tables of any family (with 0, 1 or 2 prefix rows, per
model or per stage), relative tables and FLatten's key position codes."""
import pytest
import torch
import torch.nn.functional as F

import vitlab


def _grid_rows(table, prefix, side):
    """The grid rows of a ``(1, P + side^2, C)`` table as a ``(1, C, side, side)`` map."""
    return table[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name, key, prefix, kw", [
    ("vit_tiny_patch4_32", "pos_embed", 1, dict(depth=1)),
    ("deit_tiny_distilled_patch16_224", "pos_embed", 2, dict(depth=1, patch_size=4)),
    ("cait_xxs24_224", "pos_embed", 0, dict(depth=1, depth_token_only=1, patch_size=4)),
    ("pvt_tiny", "stages.3.pos_embed", 1, dict(depths=(1, 1, 1, 1))),
    ("flatten_deit_tiny", "blocks.0.attn.pos_enc", 1, dict(depth=1, patch_size=4)),
])
def test_tables_resampled_bicubically_with_prefix_rows_kept(name, key, prefix, kw):
    small = vitlab.create_model(name, img_size=32, **kw)
    big = vitlab.create_model(name, img_size=64, **kw)
    sd = small.state_dict()
    with torch.no_grad():
        sd[key] = torch.randn_like(sd[key])
    big.load_state_dict(sd)
    got, old = big.state_dict()[key], sd[key]
    side_old, side_new = int((old.shape[1] - prefix) ** 0.5), int((got.shape[1] - prefix) ** 0.5)
    assert side_new == 2 * side_old
    torch.testing.assert_close(got[:, :prefix], old[:, :prefix])  # class / distillation rows unchanged
    ref = F.interpolate(_grid_rows(old, prefix, side_old), size=(side_new, side_new), mode="bicubic",
                        antialias=True, align_corners=False)  # timm's resample_abs_pos_embed
    torch.testing.assert_close(_grid_rows(got, prefix, side_new), ref, atol=1e-5, rtol=1e-5)


def test_a_table_that_is_not_a_square_grid_is_a_clear_error():
    model = vitlab.create_model("vit_tiny_patch4_32", depth=1)
    sd = model.state_dict()
    sd["pos_embed"] = torch.zeros(1, 1 + 12, 192)
    with pytest.raises(ValueError, match="pos_embed of shape \\(1, 13, 192\\).*12 grid tokens are not a square"):
        model.load_state_dict(sd)
