import functools

import pytest
import torch

from kd_nb.models import (CifarResNet, check_model, count_params, feature_shapes, get_model, list_models,
                          load_checkpoint, save_checkpoint)

# Parameter counts at 100 classes and numbers of state-dict entries of the published RepDistiller / SimKD code.
REFERENCE_PARAMS = {'resnet8x4': 1_233_540, 'resnet32x4': 7_433_860, 'vgg8': 3_965_028, 'vgg13': 9_462_180,
                    'MobileNetV2': 812_836, 'ShuffleV1': 949_258, 'ShuffleV2': 1_355_528, 'resnet110': 1_736_564,
                    'resnet38x2': 2_255_604, 'resnet38': 569_972, 'resnet116': 1_833_780, 'resnet14x4': 2_783_620,
                    'resnet38x4': 8_983_940, 'MobileNetV2_1_0': 2_353_060, 'ResNet50': 23_705_252}
REFERENCE_KEYS = {'resnet38': 236, 'resnet116': 704, 'resnet14x4': 98, 'resnet38x4': 242, 'MobileNetV2_1_0': 320,
                  'ResNet50': 320}
STAGES = {
    'resnet38': [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)],
    'resnet116': [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)],
    'resnet14x4': [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)],
    'resnet38x4': [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)],
    'MobileNetV2_1_0': [(24, 16, 16), (32, 8, 8), (96, 4, 4), (1280, 2, 2)],
    'ResNet50': [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
}


@functools.lru_cache(maxsize=None)
def built(name):
    "One 100-class instance per name for the whole module (ResNet50 has 23.7M parameters)."
    torch.manual_seed(0)
    return get_model(name, num_classes=100).eval()


@pytest.mark.parametrize('name,expected', REFERENCE_PARAMS.items())
def test_reference_param_counts(name, expected):
    assert count_params(built(name)) == expected


@pytest.mark.parametrize('name', STAGES)
def test_new_models_keys_and_stages(name):
    model = built(name)
    sd = model.state_dict()
    assert len(sd) == REFERENCE_KEYS[name]
    head = {'ResNet50': 'linear', 'MobileNetV2_1_0': 'classifier.0'}.get(name, 'fc')
    assert model.head is model.get_submodule(head)
    assert tuple(sd[f'{head}.weight'].shape) == (100, STAGES[name][-1][0])
    assert feature_shapes(model) == STAGES[name]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert [tuple(s.shape[1:]) for s in feats.stages] == STAGES[name]
        assert torch.allclose(model.head(feats.embedding), model(x))


def test_resnet50_layout():
    sd = built('ResNet50').state_dict()
    assert [k for k in sd if not k.startswith('layer')] == [
        'conv1.weight', 'bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var', 'bn1.num_batches_tracked',
        'linear.weight', 'linear.bias']
    assert {k: tuple(v.shape) for k, v in sd.items() if k.startswith('layer3.0.') and k.endswith('weight')} == {
        'layer3.0.conv1.weight': (256, 512, 1, 1), 'layer3.0.bn1.weight': (256,), 'layer3.0.conv2.weight': (256, 256, 3, 3),
        'layer3.0.bn2.weight': (256,), 'layer3.0.conv3.weight': (1024, 256, 1, 1), 'layer3.0.bn3.weight': (1024,),
        'layer3.0.shortcut.0.weight': (1024, 512, 1, 1), 'layer3.0.shortcut.1.weight': (1024,)}
    assert 'layer3.1.shortcut.0.weight' not in sd


def test_new_models_load_strict(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    for name in ['resnet38', 'MobileNetV2_1_0']:
        torch.manual_seed(1)
        src = get_model(name).eval()
        path = save_checkpoint(src, tmp_path / f'{name}.pth')
        torch.manual_seed(2)
        dst = get_model(name).eval()
        with torch.no_grad():
            assert not torch.equal(dst(x), src(x))
            assert torch.equal(load_checkpoint(dst, path, strict=True)(x), src(x))
    with pytest.raises(ValueError, match='does not fit wrn_40_1; missing keys'):
        load_checkpoint(get_model('wrn_40_1'), tmp_path / 'resnet38.pth')


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match='resnet8x4'):
        get_model('resnet9')
    assert len(list_models()) == 31
    assert set(REFERENCE_PARAMS) <= set(list_models())


def test_check_model_names_the_knob():
    assert check_model('ResNet50', knob='teacher') == 'ResNet50'
    with pytest.raises(ValueError, match=r"^teacher: unknown 'resnet50'; valid: resnet8, resnet14, .*ShuffleV2_1_5$"):
        check_model('resnet50', knob='teacher')
    with pytest.raises(ValueError, match=r"^model: unknown 'x'"):
        check_model('x')
    with pytest.raises(ValueError, match=r"^student: unknown None"):
        check_model(None, knob='student')


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


def test_checkpoint_errors_name_the_knob(tmp_path):
    path = save_checkpoint(get_model('resnet8'), tmp_path / 'y.pt')
    with pytest.raises(ValueError) as e:
        load_checkpoint(get_model('resnet20'), path, knob='teacher_ckpt')
    assert str(e.value).startswith(f'teacher_ckpt: {path} does not fit resnet20; missing keys')
    with pytest.raises(ValueError) as e:
        load_checkpoint(CifarResNet(20, (16, 16, 32, 64)), path)
    assert str(e.value).startswith(f'path: {path} does not fit CifarResNet; ')
    (tmp_path / 'bad.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError) as e:
        load_checkpoint(get_model('resnet8'), tmp_path / 'bad.pt', knob='teacher_ckpt')
    assert str(e.value).startswith(f"teacher_ckpt: {tmp_path / 'bad.pt'} is not a readable torch checkpoint (")
    with pytest.raises(ValueError, match='^teacher_ckpt: no checkpoint file at'):
        load_checkpoint(get_model('resnet8'), tmp_path / 'missing.pt', knob='teacher_ckpt')
