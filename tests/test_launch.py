"""Launching: sbatch scripts, sweeps and requeue on preemption, through a real one-node SLURM
cluster (CI starts it with .ci/slurm-cluster)."""

import csv
import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from forgetless import checkpoint, config, metrics, runlock
from forgetless.config import ConfigError, PretrainConfig
from forgetless.errors import UserError
from forgetless.launch import cli as launch_cli
from forgetless.launch import sweep
from forgetless.recipes import pretrain

from .conftest import MODEL
from .test_pretrain import TINY


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "forgetless", *args], capture_output=True,
                          text=True, **kwargs)


def test_dry_run_of_a_4_node_8_gpu_job(tmp_path):
    out = _cli("launch", "slurm", "--dry-run", "--nodes", "4", "--gpus-per-node", "8",
               "--time", "12:00:00", "--partition", "gpu", "pretrain", "pretrain-gpu",
               f"run_dir={tmp_path / 'big'}", "opt.lr=2e-3")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120",
                 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 f"ARGS=(pretrain pretrain-gpu run_dir={tmp_path / 'big'} opt.lr=2e-3)"):
        assert line in script.splitlines(), line
    torchrun = re.search(r"^TORCHRUN='(.*)'$", script, re.M).group(1).split()
    assert torchrun[torchrun.index("--") + 1:] == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=$SLURM_JOB_NUM_NODES",
        "--node_rank=$SLURM_NODEID", "--nproc_per_node=8", "--master_addr=$MASTER_ADDR",
        "--master_port=$MASTER_PORT", "-m", "forgetless"]
    assert "srun --ntasks-per-node=1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # what srun's task runs on node 2 of 4: the torchrun line, with the program's arguments
    env = "SLURM_JOB_NUM_NODES=4 SLURM_NODEID=2 MASTER_ADDR=n0 MASTER_PORT=21234"
    shown = subprocess.run(["bash", "-c", f"{env}; TORCHRUN='{' '.join(torchrun)}'; "
                            'set -- pretrain opt.lr=2e-3; eval echo "$TORCHRUN" \\"\\$@\\"'],
                           capture_output=True, text=True).stdout.split()
    assert shown[shown.index("--") + 1:] == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=4", "--node_rank=2",
        "--nproc_per_node=8", "--master_addr=n0", "--master_port=21234", "-m", "forgetless",
        "pretrain", "opt.lr=2e-3"]


@pytest.fixture(scope="module")
def cluster():
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    assert state.returncode == 0 and any(s in state.stdout for s in ("idle", "mixed")), (
        "no SLURM cluster: start one with `bash .ci/slurm-cluster` (CI does)")


def _wait_job(job_id, timeout=300):
    start = time.monotonic()
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True,
                         text=True).stdout.strip():
        assert time.monotonic() - start < timeout, f"job {job_id} still queued"
        time.sleep(1)


def _job_id(output):
    return re.search(r"submitted job (\d+)", output).group(1)


def _sweep_file(tmp_path, manifest, grid, name="lr"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "program": "pretrain", "out": str(tmp_path / name),
        "base": {**dict(a.split("=", 1) for a in TINY), "data": str(manifest.path),
                 "stop.steps": 4, "threads": 1},
        "grid": grid}))
    return path


def test_sweep_job_array_skips_finished_runs(cluster, manifest, tmp_path):
    path = _sweep_file(tmp_path, manifest, {"opt.lr": [0.001, 0.002]})
    out = _cli("sweep", str(path), "--slurm")
    assert out.returncode == 0, out.stderr
    assert "2 runs, 0 finished, 0 running or pending, 2 to run" in out.stdout
    _wait_job(_job_id(out.stdout))
    runs = sweep.elements(sweep.load(path))
    assert [r.name for r in runs] == ["lr=0.001", "lr=0.002"]
    for r in runs:
        assert r.status().state == "finished", (r.name, list(r.run_dir.glob("slurm-*.out")))
        state = checkpoint.read_state(checkpoint.latest(r.run_dir))
        assert state["step"] == 4 and state["config"]["opt"]["lr"] == float(r.name[3:])
    again = _cli("sweep", str(path), "--slurm")
    assert again.returncode == 0 and "submitted" not in again.stdout
    assert again.stdout.count("finished") == 2


def test_sweep_reports_a_failed_element(manifest, tmp_path):
    path = _sweep_file(tmp_path, manifest, {"model.head_dim": [16, 5]}, name="bad")
    out = _cli("sweep", str(path))
    assert out.returncode == 1
    assert "failed: head_dim=5 (failed (exit 2))" in out.stderr
    status = _cli("sweep", str(path), "--status")
    assert "head_dim=16" in status.stdout and "finished" in status.stdout
    assert status.returncode == 1 and "failed (exit 2)" in status.stdout


def _statuses(path):
    return {r.name: str(r.status()) for r in sweep.elements(sweep.load(path))}


def test_sweep_status_tells_pending_running_and_preempted_from_failed(cluster, manifest,
                                                                      tmp_path, capsys):
    path = _sweep_file(tmp_path, manifest, {"opt.lr": [0.001, 0.002, 0.003]})
    runs = {r.name: r for r in sweep.elements(sweep.load(path))}
    preempted, held = runs["lr=0.002"].run_dir, runs["lr=0.003"].run_dir
    preempted.mkdir(parents=True)
    (preempted / "launch-exit-code").write_text("75\n")
    held.mkdir(parents=True)
    lock = runlock.acquire(held)  # another trainer at work in it
    assert launch_cli.run_sweep([str(path), "--status"]) == 0  # preempted is not failed
    assert "preempted (exit 75; resubmit to resume)" in capsys.readouterr().out
    # a job array that stays queued for an hour: the running element is not part of it
    assert launch_cli.run_sweep([str(path), "--slurm", "--sbatch=--begin=now+1hour"]) == 0
    out = capsys.readouterr().out
    job = _job_id(out)
    try:
        assert "lr=0.003: running (host" in out and "left alone" in out
        assert "3 runs, 0 finished, 1 running or pending, 2 to run" in out
        status = _statuses(path)
        assert status["lr=0.001"] == f"pending (job {job}_0 pending)"
        assert status["lr=0.002"] == f"preempted (requeued: job {job}_1 pending)"
        assert status["lr=0.003"].startswith(f"running (host {runlock.holder_info()['host']}")
        for again in ([str(path), "--slurm"], [str(path)]):  # resubmitted, or run here
            assert launch_cli.run_sweep(again) == 0
            assert "submitted" not in capsys.readouterr().out
        assert not (runs["lr=0.001"].run_dir / "metrics.jsonl").exists()
    finally:
        subprocess.run(["scancel", job], check=True)
        lock.release()
    _wait_job(job)
    status = _statuses(path)
    assert status == {"lr=0.001": "not run", "lr=0.003": "not run",
                      "lr=0.002": "preempted (exit 75; resubmit to resume)"}
    assert launch_cli.run_sweep([str(path), "--slurm", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "3 to run" in script and "#SBATCH --array=0-2" in script


def test_launch_refuses_what_it_cannot_run_and_submits_a_study(tmp_path, capsys):
    with pytest.raises(UserError, match="`forgetless sweep FILE --slurm`"):
        launch_cli.launch(["slurm", "--dry-run", "sweep", "lr.yaml"])
    with pytest.raises(UserError, match="cannot launch 'bogus'; programs: data, evaluate"):
        launch_cli.launch(["local", "bogus"])
    with pytest.raises(ConfigError, match="finetune.bogus"):
        launch_cli.launch(["slurm", "--dry-run", "study", "high-lr", "finetune.bogus=1"])
    out = tmp_path / "study"
    assert launch_cli.launch(["slurm", "--dry-run", "study", "high-lr", "--out", str(out),
                              "finetune.lam=3"]) == 0
    script = capsys.readouterr().out.splitlines()
    assert f"ARGS=(study high-lr --out {out} finetune.lam=3)" in script
    assert f"RUN_DIR={out}" in script and f"#SBATCH --output={out}/slurm-%j.out" in script
    sweep_file = tmp_path / "s.yaml"
    for program in ("generate", "quickstart", "study", "data prepare"):
        sweep_file.write_text(yaml.safe_dump({"program": program, "out": str(tmp_path),
                                              "grid": {"seed": [0, 1]}}))
        with pytest.raises(ConfigError, match=f"program '{program}' does not write a run_dir; "
                                              "a sweep can run finetune, pretrain"):
            sweep.load(sweep_file)


def test_preempted_job_requeues_and_finishes_like_an_uninterrupted_run(cluster, manifest,
                                                                       tmp_path):
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", f"data={manifest.path}", *TINY, "stop.steps=150",
            "eval.interval=50", "eval.log_interval=1", "threads=1"]
    out = _cli("launch", "slurm", "pretrain", *args)
    assert out.returncode == 0, out.stderr
    job = _job_id(out.stdout)
    start = time.monotonic()
    while not [r for r in _records(run_dir) if r.get("step", 0) >= 3]:
        assert time.monotonic() - start < 180, "the job did not start training"
        time.sleep(0.2)
    # what --signal=B:USR1 does before the time limit
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    _wait_job(job, timeout=400)
    log = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    assert "preempted: requeueing job" in log, log[-3000:]
    assert re.search(r"resuming from .*step_\d+ \(step (\d+)\)", log), log[-3000:]
    final = checkpoint.read_state(checkpoint.latest(run_dir))
    assert final["finished"] and final["step"] == 150
    single = tmp_path / "single"
    pretrain.run(config.load(PretrainConfig, None, [f"run_dir={single}", *args[1:]]))
    ours, theirs = _records(run_dir)[-1], metrics.read(single / "metrics.jsonl")[-1]
    assert ours["step"] == theirs["step"] == 150
    assert ours["valid_ntp"] == pytest.approx(theirs["valid_ntp"], abs=1e-6)
    assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-6)


def _records(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    if lines and not lines[-1].endswith("}"):  # being written
        lines = lines[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def test_study_writes_table_and_figure(world, tmp_path):
    out = tmp_path / "study"
    tiny = [f"pretrain.data={world['prev'].path}", *[f"pretrain.{m}" for m in MODEL],
            "pretrain.opt.batch_size=8", "pretrain.stop.tokens=null", "pretrain.stop.steps=6",
            "pretrain.eval.interval=6", "pretrain.eval.max_sequences=16", "generate.samples=16",
            f"finetune.data={world['down'].path}", "finetune.opt.batch_size=8",
            "finetune.replay.batch_size=4", "finetune.stop.tokens=null", "finetune.stop.steps=2",
            "finetune.eval.interval=2", "finetune.eval.max_sequences=16"]
    result = _cli("study", "learning-rate", "--out", str(out), *tiny)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert len(rows) == 2 * 3 * 2  # pretraining LRs x finetuning LRs x (none, kl_pre)
    assert {r["pretrain"] for r in rows} == {"plr=0.0005", "plr=0.002"}
    assert {float(r["lr"]) for r in rows} == {3e-4, 1e-3, 3e-3}
    assert all(float(r["forgetting"]) == pytest.approx(float(r["prev_ntp"])
                                                       - float(r["prev_ntp_before"]))
               for r in rows)
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    assert "| pretrain | finetune |" in (out / "table.md").read_text()
