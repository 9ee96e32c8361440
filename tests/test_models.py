import pytest
import torch

from kd_nb.models import count_params, get_model, list_models, load_checkpoint, save_checkpoint

REFERENCE_PARAMS = {'resnet8x4': 1_233_540, 'resnet32x4': 7_433_860, 'vgg8': 3_965_028, 'vgg13': 9_462_180,
                    'MobileNetV2': 812_836, 'ShuffleV1': 949_258, 'ShuffleV2': 1_355_528, 'resnet110': 1_736_564,
                    'resnet38x2': 2_255_604}


@pytest.mark.parametrize('name,expected', REFERENCE_PARAMS.items())
def test_reference_param_counts(name, expected):
    assert count_params(get_model(name, num_classes=100)) == expected


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match='resnet8x4'):
        get_model('resnet9')
    assert len(list_models()) == 25


def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    src = get_model('resnet8x4')
    with torch.no_grad():
        src(torch.randn(4, 3, 32, 32))  # move the batch-norm running statistics
    path = save_checkpoint(src.eval(), tmp_path / 'ckpt.pth', epoch=3)
    torch.manual_seed(1)
    dst = load_checkpoint(get_model('resnet8x4'), path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    with pytest.raises(ValueError, match='missing'):
        load_checkpoint(get_model('resnet32x4'), path)
