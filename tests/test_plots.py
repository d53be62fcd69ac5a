"""Run-directory plots: the training curves read every attempt's metrics in order."""

from dparallel.core.plots import read_metrics, training_curves


def _log(run, version: int, text: str) -> None:
    folder = run / "logs" / f"version_{version}"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(text)


def test_training_curves_follow_a_resumed_run_across_attempts(tmp_path):
    _log(tmp_path, 0, "epoch,step,train/loss,train/lr\n0,9,2.5,0.001\n0,19,2.0,0.001\n")
    _log(tmp_path, 1, "epoch,step,train/loss,train/lr,val/kl\n0,29,1.5,0.0005,\n0,39,1.25,0.0005,0.75\n")
    _log(tmp_path, 10, "epoch,step,train/loss\n0,49,1.0\n")  # version_10 sorts after version_1, not before it
    series = read_metrics(tmp_path)
    assert series["train/loss"] == [(9, 2.5), (19, 2.0), (29, 1.5), (39, 1.25), (49, 1.0)]
    assert series["val/kl"] == [(39, 0.75)] and "epoch" not in series
    out = training_curves(tmp_path)
    assert out == tmp_path / "train.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_no_metrics_no_plot(tmp_path):
    assert training_curves(tmp_path) is None and not (tmp_path / "train.png").exists()
