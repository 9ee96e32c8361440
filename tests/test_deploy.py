"kd-deploy on quick runs of synthetic CIFAR: export and its top-1 check, int8 after training, latency, and a run trained quantized."
import json
from pathlib import Path
import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from conftest import quick_params
from kd_nb.cli import deploy_main
from kd_nb.deploy import BEST, MODEL, INT8_MODEL, REPORT, BENCH_FILES, INPUT, run_loaders, run_model, onnx_session, runtime_ops
from kd_nb.distill import deployed_module
from kd_nb.experiment import RUN_KEYS, build_distiller, resolve_config, run_experiment
from kd_nb.models import get_model
from kd_nb.runs import open_run
from kd_nb.trainer import evaluate


def untrained_run(data_dir, runs_dir, name='r', **knobs) -> Path:
    "A finished-looking scratch run of an untrained resnet8 (its quantizers, if any, shown one training batch), its top-1 measured by the trainer's `evaluate`: no training time."
    cfg = resolve_config(**quick_params(data_dir, runs_dir, method='scratch', run_name=name, **knobs))
    run = open_run(runs_dir, name, cfg, RUN_KEYS)
    torch.manual_seed(cfg['seed'])
    d = build_distiller(cfg, get_model(cfg['student'], 100))
    if cfg['quant_bits']:
        with torch.enable_grad(): d.train(); deployed_module(d)(next(iter(run_loaders(cfg).train))[0]); d.eval()
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


def files_of(folder) -> dict:
    "Every file under `folder` with its size and modification time."
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.mark.slow
def test_study_deploys_a_folder_and_the_table_figure_and_readme_read_its_files(synthetic_cifar100, tmp_path, capsys):
    from kd_nb.run_table import load_runs, load_deploy
    from kd_nb.stats import deploy_stats, seed_interval, paired_interval, difference_text
    from kd_nb.tables import deploy_table, deploy_caption, deploy_reading, fill_tables, markdown_table
    from kd_nb.figures import deploy_figure
    runs = tmp_path / 'study'
    for seed in (0, 1):
        untrained_run(synthetic_cifar100, runs, f'scratch-s{seed}', seed=seed)
        untrained_run(synthetic_cifar100, runs, f'scratch-q8-s{seed}', seed=seed, quant_bits=8)
    (runs / 'cut').mkdir(); (runs / 'cut' / 'summary.json').write_text(json.dumps({'run_id': 'cut', 'status': 'running'}))
    assert deploy_main(['study', str(runs), '--calls', '50']) == 2                      # checked before any run
    assert 'kd-deploy: error: calls: at least 200 for a median and a 95th percentile, got 50' in capsys.readouterr().err
    assert not any(runs.rglob('*.onnx'))
    assert deploy_main(['study', str(runs), '--rounds', '0']) == 2
    assert 'kd-deploy: error: rounds: a whole number of rounds, at least 1, got 0' in capsys.readouterr().err
    assert deploy_main(['study', str(runs), '--calibration-images', '100', '--rounds', '2']) == 0
    out = capsys.readouterr().out
    assert 'cut: all: not finished (status running)' in out and out.count(': bench: wrote bench-cpu-') == 4
    names = ['scratch-q8-s0', 'scratch-q8-s1', 'scratch-s0', 'scratch-s1']
    for name in names:
        d = runs / name / 'deploy'
        assert (d / MODEL).is_file() and (d / INT8_MODEL).is_file() and len(list(d.glob(BENCH_FILES))) == 1
    assert 'QLinearConv' in runtime_ops(runs / 'scratch-q8-s0' / 'deploy' / INT8_MODEL)  # the QAT row's file runs int8 kernels
    assert 'QLinearConv' not in runtime_ops(runs / 'scratch-q8-s0' / 'deploy' / MODEL)

    before = files_of(runs)
    assert deploy_main(['study', str(runs)]) == 0                                          # everything is there: kept, nothing written
    out = capsys.readouterr().out
    assert out.count(': kept ') == 12 and 'wrote' not in out and files_of(runs) == before

    stats = deploy_stats(load_runs(runs), load_deploy(runs))
    assert stats[['label', 'precision', 'n']].values.tolist() == [['scratch', 'fp32', 2], ['scratch', 'int8 (PTQ)', 2], ['scratch', 'QAT 8-bit', 2]]
    report = {n: json.loads((runs / n / 'deploy' / REPORT).read_text()) for n in names}
    bench = {n: json.loads(next((runs / n / 'deploy').glob(BENCH_FILES)).read_text()) for n in names}
    files = {'fp32': (['scratch-s0', 'scratch-s1'], 'fp32', 'student'), 'int8 (PTQ)': (['scratch-s0', 'scratch-s1'], 'int8', 'student_int8'),
             'QAT 8-bit': (['scratch-q8-s0', 'scratch-q8-s1'], 'int8', 'student_int8')}
    table = deploy_table(stats)
    for (precision, (runs_of, key, model)), row, cells in zip(files.items(), stats.to_dict('records'), table.to_dict('records')):
        top1 = [report[n][key]['top1'] for n in runs_of]
        assert row['values'] == top1 and {k: row[k] for k in ('n', 'mean', 'lo', 'hi')} == {k: seed_interval(top1)[k] for k in ('n', 'mean', 'lo', 'hi')}
        mean = lambda field: sum(bench[n]['models'][model][field] for n in runs_of) / 2
        assert cells['size (KB)'] == f"{sum(report[n][key]['bytes'] for n in runs_of) / 2 / 1000:,.1f}"
        assert cells['batch-1 latency (ms), median / p95'].split(' †')[0] == f"{mean('latency_ms_median'):.3f} / {mean('latency_ms_p95'):.3f}"
        assert cells['top-1 (%) [95% CI]'] == f"{row['mean']:.2f} [{row['lo']:.2f}, {row['hi']:.2f}]"
    fp32 = pd.Series(stats['values'][0], index=[0, 1])
    assert stats['vs fp32'][1] == paired_interval(pd.Series(stats['values'][1], index=[0, 1]), fp32)
    assert stats['vs fp32'][2] == paired_interval(pd.Series(stats['values'][2], index=[0, 1]), fp32)
    assert table['teacher ÷ latency'].tolist() == ['—'] * 3                              # runs trained alone: no teacher timed
    assert deploy_caption(stats).count(bench['scratch-s0']['device_name']) == 1
    assert len({b['timestamp'] for b in bench.values()}) == 1                              # the study timed in one bench
    assert "all of a study's files timed in one bench, in 2 rounds that each visit every file in a new order" in deploy_caption(stats)

    ax = deploy_figure(stats).axes[0]
    assert len(ax.containers) == 3 and [c.lines[0].get_marker() for c in ax.containers] == ['o', 's', '^']
    page = fill_tables('<!-- deploy: study -->\n<!-- /deploy -->\n', tmp_path)
    assert markdown_table(table) in page and page.endswith(f'*\n\n{deploy_reading(stats)}\n<!-- /deploy -->\n')
    pooled = difference_text(stats['vs fp32'][1])                                          # one method: pooled = its own paired interval
    assert f"**int8 (PTQ) against fp32**: top-1 {pooled} pooled over the seeds of 1 method setting (n=2); scratch {pooled}." in deploy_reading(stats)

    r = json.loads((runs / 'scratch-s1' / 'deploy' / REPORT).read_text())                # a file export.json does not record
    (runs / 'scratch-s1' / 'deploy' / REPORT).write_text(json.dumps({**r, 'int8': None}))
    assert deploy_main(['study', str(runs)]) == 1
    out = capsys.readouterr().out
    assert f"scratch-s1: int8: {runs / 'scratch-s1' / 'deploy' / INT8_MODEL}: there, but export.json records no top-1 for it" in out
    assert out.count(': bench: kept ') == 3                                                 # the other runs went on


def test_a_process_that_turned_tf32_off_still_exports(tmp_path):
    "A run turns TF32 off before it trains (`ieee_fp32`); an export later in the same process must still pass torch.export's flag check."
    from kd_nb.deploy import export_onnx
    from kd_nb.hardware import ieee_fp32
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        ieee_fp32()
        model, x = get_model('resnet8', 10).eval(), torch.randn(2, 3, 32, 32)
        got = onnx_session(export_onnx(model, tmp_path / 'm.onnx')).run(None, {INPUT: x.numpy()})[0]
        np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
