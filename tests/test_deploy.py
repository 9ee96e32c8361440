"kd-deploy on quick runs of synthetic CIFAR: export and its top-1 check, int8 after training, latency, and a run trained quantized."
import json
from pathlib import Path
import numpy as np
import onnx
import pytest
import torch
from conftest import quick_params
from kd_nb.cli import deploy_main
from kd_nb.deploy import BEST, MODEL, INT8_MODEL, REPORT, run_loaders, run_model, onnx_session
from kd_nb.distill import deployed_module
from kd_nb.experiment import RUN_KEYS, build_distiller, resolve_config, run_experiment
from kd_nb.models import get_model
from kd_nb.runs import open_run
from kd_nb.trainer import evaluate


def untrained_run(data_dir, runs_dir, name='r') -> Path:
    "A finished-looking scratch run of an untrained resnet8, its top-1 measured by the trainer's `evaluate`: no training time."
    cfg = resolve_config(**quick_params(data_dir, runs_dir, method='scratch', run_name=name))
    run = open_run(runs_dir, name, cfg, RUN_KEYS)
    torch.manual_seed(0)
    d = build_distiller(cfg, get_model(cfg['student'], 100))
    torch.save({'deployed': deployed_module(d).state_dict()}, run.path / BEST)
    run.finish(best_test_acc=evaluate(d, run_loaders(cfg).test)['test_acc1'])
    run.close()
    return run.path


def test_export_errors_name_the_folder_and_both_numbers(synthetic_cifar100, tmp_path, capsys):
    run = untrained_run(synthetic_cifar100, tmp_path / 'runs')
    recorded = json.loads((run / 'summary.json').read_text())['best_test_acc']
    summary = json.loads((run / 'summary.json').read_text())
    (run / 'summary.json').write_text(json.dumps({**summary, 'best_test_acc': recorded + 0.1}))
    assert deploy_main(['export', str(run)]) == 2
    err = capsys.readouterr().err
    assert f'top-1 {recorded:.2f}% in ONNX Runtime' in err and f'the run recorded {recorded + 0.1:.2f}%' in err
    assert not (run / 'deploy' / MODEL).exists()                      # a failed check leaves no file
    (run / 'summary.json').write_text(json.dumps(summary))
    assert deploy_main(['export', str(run)]) == 0
    assert deploy_main(['export', str(run)]) == 2 and '--force' in capsys.readouterr().err
    (run / BEST).unlink()
    assert deploy_main(['export', str(run), '--force']) == 2
    assert f'kd-deploy: error: {run}: no best.pt' in capsys.readouterr().err


def ops(path) -> set: return {n.op_type for n in onnx.load(str(path)).graph.node}


def logit_gap(run, path) -> tuple[float, float]:
    "The largest difference between the logits of ONNX Runtime and of the rebuilt PyTorch model on the run's test images, and the share of changed predictions."
    module, params = run_model(run)
    x, _ = next(iter(run_loaders(params).test))
    got = onnx_session(path).run(None, {'images': x.numpy()})[0]
    with torch.no_grad(): want = module(x).numpy()
    return float(np.abs(got - want).max()), float((got.argmax(1) != want.argmax(1)).mean())


@pytest.fixture(scope='module')
def synthetic_cifar10(tmp_path_factory):
    "Ten classes: a run of a few seconds already tells them apart."
    from kd_nb.data import make_synthetic_cifar
    return make_synthetic_cifar(tmp_path_factory.mktemp('data10'), 'cifar10', n_train=640, n_test=200, seed=0)


@pytest.mark.slow
def test_export_int8_and_bench_of_simkd_and_a_run_trained_quantized(synthetic_cifar10, tmp_path, capsys):
    runs = tmp_path / 'runs'
    quiet = lambda *a, **k: None
    knobs = lambda **k: quick_params(synthetic_cifar10, runs, dataset='cifar10', method='simkd', epochs=2, **k)
    s = run_experiment(log=quiet, **knobs(run_name='simkd'))
    run = runs / 'simkd'
    assert deploy_main(['export', str(run), '--int8', '--calibration-images', '200']) == 0
    r = json.loads((run / 'deploy' / REPORT).read_text())
    assert r['recorded_top1'] == s['best_test_acc'] and abs(r['fp32']['top1'] - s['best_test_acc']) <= 0.05
    assert r['fp32']['test_images'] == 200 and r['int8']['calibration_images'] == 200
    assert r['int8']['drop'] == pytest.approx(s['best_test_acc'] - r['int8']['top1'])
    assert 'QuantizeLinear' in ops(run / 'deploy' / INT8_MODEL) and 'QuantizeLinear' not in ops(run / 'deploy' / MODEL)
    assert r['int8']['bytes'] < r['fp32']['bytes'] / 2
    assert logit_gap(run, run / 'deploy' / MODEL) < (1e-4, 1e-9)       # the float export computes what PyTorch computes
    assert deploy_main(['bench', str(run), '--json', str(tmp_path / 'bench.json')]) == 0
    b = json.loads((tmp_path / 'bench.json').read_text())
    assert b['device_name'] and b['onnxruntime'] and b['config']['calls'] >= 200 and set(b['models']) == {'student', 'student_int8', 'teacher'}
    assert all(m[k] > 0 for m in b['models'].values() for k in ('bytes', 'latency_ms_median', 'latency_ms_p95', 'throughput_images_per_s'))
    assert b['teacher_over_student']['student']['bytes'] > 0
    print(capsys.readouterr().out)

    q = run_experiment(log=quiet, **knobs(run_name='simkd-q8', quant_bits=8))
    assert json.loads((runs / 'simkd-q8' / 'config.json').read_text())['params']['quant_bits'] == 8 and q['deploy_weight_bits'] == 8
    assert q['deploy_params'] == s['deploy_params']
    assert deploy_main(['export', str(runs / 'simkd-q8')]) == 0
    r = json.loads((runs / 'simkd-q8' / 'deploy' / REPORT).read_text())
    assert r['fp32'] is None and r['qat']['weight_bits'] == 8 and abs(r['qat']['top1'] - q['best_test_acc']) <= 0.05
    model = onnx.load(str(runs / 'simkd-q8' / 'deploy' / MODEL))
    assert {'QuantizeLinear', 'DequantizeLinear'} <= {n.op_type for n in model.graph.node}
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer) >= 10   # the weights, stored as int8
    gap, changed = logit_gap(runs / 'simkd-q8', runs / 'simkd-q8' / 'deploy' / MODEL)
    assert gap < 0.1 and changed <= 0.01                              # the training's quantization, up to rounding at its boundaries
    assert deploy_main(['export', str(runs / 'simkd-q8'), '--int8', '--force', '--calibration-images', '200']) == 0
    r = json.loads((runs / 'simkd-q8' / 'deploy' / REPORT).read_text())
    assert r['int8']['trained_bits'] == 8 and r['int8']['drop'] == pytest.approx(q['best_test_acc'] - r['int8']['top1'])
    assert 'QuantizeLinear' in ops(runs / 'simkd-q8' / 'deploy' / INT8_MODEL)
    print(json.dumps(r, indent=1))
