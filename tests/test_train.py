"""memfit train: bitwise resume (exception, SIGTERM), atomic checkpoints, truncated-checkpoint fallback, NaN stop."""

import signal
import subprocess
import sys
import time

import pytest

from memfit.data import TextDataset
from memfit.models import ModelSpec
from memfit.train import CheckpointError, TrainConfig, load_config, train

BASE = {"model": "tiny", "batch_size": 2, "seq_len": 16, "warmup_steps": 2, "checkpoint_every": 2}


def _cfg(tmp_path, name, **kw):
    return TrainConfig(**{**BASE, "out": str(tmp_path / name), **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 8 steps: the losses every resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref")
    return train(TrainConfig(**{**BASE, "out": str(out / "a"), "steps": 8}), say=lambda _m: None)["losses"]


def test_resume_after_an_exception_is_bitwise_identical(tmp_path, monkeypatch, reference):
    real = TextDataset.batch

    def failing(self, split, step, *a, **kw):
        if split == "train" and step == 5:
            raise RuntimeError("boom")
        return real(self, split, step, *a, **kw)

    cfg = _cfg(tmp_path, "b", steps=8)
    monkeypatch.setattr(TextDataset, "batch", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, say=lambda _m: None)
    monkeypatch.setattr(TextDataset, "batch", real)
    got = train(cfg, resume=True, say=lambda _m: None)["losses"]
    assert got == reference  # exact float equality, every step
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[1]) for r in rows] == reference  # no duplicated or missing rows


@pytest.mark.slow
def test_truncated_checkpoint_is_reported_and_the_previous_one_is_used(tmp_path, reference):
    cfg = _cfg(tmp_path, "c", steps=6, keep=3)
    train(cfg, say=lambda _m: None)
    ckpts = sorted((tmp_path / "c").glob("checkpoint-*.pt"))
    assert [p.name for p in ckpts] == [
        "checkpoint-00000002.pt",
        "checkpoint-00000004.pt",
        "checkpoint-00000006.pt",
    ]
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 2])
    messages = []
    got = train(_cfg(tmp_path, "c", steps=8, keep=3), resume=True, say=messages.append)["losses"]
    assert any("checkpoint-00000006.pt is unusable" in m for m in messages)
    assert any("resumed from step 4" in m for m in messages)
    assert got == reference
    for p in ckpts[:-1]:
        p.write_bytes(b"garbage")
    ckpts[-1].unlink()
    for extra in (tmp_path / "c").glob("checkpoint-*.pt"):
        extra.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        train(cfg, resume=True, say=lambda _m: None)


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_resume_is_bitwise_identical(tmp_path):
    steps = 40
    reference = train(_cfg(tmp_path, "ref40", steps=steps, checkpoint_every=1000), say=lambda _m: None)[
        "losses"
    ]
    out = tmp_path / "d"
    cmd = [
        sys.executable,
        "-m",
        "memfit.cli",
        "train",
        "--model",
        "tiny",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--warmup-steps",
        "2",
        "--checkpoint-every",
        "1000",
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # header + 2 steps
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    done = len(metrics.read_text().splitlines()) - 1
    # stopped mid-run: exit status 143 and a checkpoint at the step it stopped after (none was due before)
    assert proc.returncode == 143 and 2 <= done < steps, (proc.returncode, done, proc.stderr.read())
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{done:08d}.pt"]
    got = train(
        TrainConfig(**{**BASE, "checkpoint_every": 1000, "steps": steps, "out": str(out)}),
        resume=True,
        say=lambda _m: None,
    )["losses"]
    assert got == reference


def test_non_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    real = ModelSpec.loss_fn
    calls = {"n": 0}

    def poisoned(self, model, batch):
        calls["n"] += 1
        loss = real(self, model, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(ModelSpec, "loss_fn", poisoned)
    with pytest.raises(FloatingPointError, match="loss is nan at step 2"):
        train(_cfg(tmp_path, "e", steps=5), say=lambda _m: None)
    # nothing after the bad step was saved: the last checkpoint is the one before it
    assert [p.name for p in (tmp_path / "e").glob("checkpoint-*.pt")] == ["checkpoint-00000002.pt"]
    assert not list((tmp_path / "e").glob("*.tmp"))


def test_config_file_unknown_keys_and_saved_resolved_config(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('model = "tiny"\noptimizer = "adam"\nsteps = 3\n[optimizer_args]\nbetas = [0.9, 0.95]\n')
    cfg = load_config(good, out=str(tmp_path / "f"), batch_size=2, seq_len=8)
    assert cfg.optimizer == "adam" and cfg.steps == 3 and cfg.batch_size == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("model = 'tiny'\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key.*learning_rate"):
        load_config(bad)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="lion")


def test_remat_compile_leaves_the_global_rng_alone():
    """Capturing draws random numbers (tracing, calibration); compile must not shift the user's stream, or a
    resumed run (which restores the RNG state, then compiles) would diverge from an uninterrupted one."""
    import torch

    from memfit import remat
    from memfit.models import get_model

    spec = get_model("tiny")
    torch.manual_seed(0)
    model = spec.build()
    example = TextDataset.from_file().batch("train", 0, 2, 16, seed=0)
    before = torch.get_rng_state()
    remat.compile(model, spec.loss_fn, example, budget=1.0)
    assert torch.equal(torch.get_rng_state(), before)
