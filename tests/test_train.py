"""memfit train: bitwise resume (exception, SIGTERM), atomic checkpoints, truncated-checkpoint fallback, NaN stop."""

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memfit.data import TextDataset
from memfit.models import ModelSpec
from memfit.train import CheckpointError, ConfigError, TrainConfig, load_config, train

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


def test_remat_compile_leaves_the_global_rng_alone(monkeypatch):
    """Capturing draws random numbers (the calibration); compile must not shift the user's stream, or a
    resumed run (which restores the RNG state, then compiles) would diverge from an uninterrupted one."""
    import torch

    from memfit import remat
    from memfit.models import get_model

    spec = get_model("tiny")
    torch.manual_seed(0)
    model = spec.build()
    example = TextDataset.from_file().batch("train", 0, 2, 16, seed=0)
    # the device calibration draws random matrices once per process (a resumed run's first compile): redo it
    monkeypatch.setattr("memfit.remat.eager.costs._RATES", {})
    before = torch.get_rng_state()
    remat.compile(model, spec.loss_fn, example, budget=1.0)
    assert torch.equal(torch.get_rng_state(), before)


def _rows(out):
    return [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]


def test_lr_zero_is_taken_as_given(tmp_path):
    """``lr = 0`` trains at 0 (it used to train at 0.1: ``lr or 0.1``): the weights end where they started."""
    import torch

    from memfit.models import get_model

    cfg = _cfg(tmp_path, "lr0", steps=3, lr=0.0, warmup_steps=0)
    assert cfg.lr == 0.0
    train(cfg, say=lambda _m: None)
    assert [float(r[2]) for r in _rows(tmp_path / "lr0")] == [0.0, 0.0, 0.0]
    torch.manual_seed(cfg.seed)
    initial = get_model("tiny").build().state_dict()
    final = torch.load(tmp_path / "lr0" / "checkpoint-00000003.pt", weights_only=False)["model"]
    assert all(torch.equal(initial[k], final[k]) for k in initial)


def test_negative_eval_every_and_wrong_types_are_rejected():
    for kw, text in [
        ({"eval_every": -1}, "eval_every must be >= 0"),
        ({"steps": "ten"}, "steps must be an integer"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"optimizer_args": {"momentun": 0.9}}, "did you mean 'momentum'"),
        ({"model": "cnn"}, "model must be a GPT preset"),
        ({"lr": -0.1}, "lr must be a finite number >= 0"),
    ]:
        with pytest.raises(ConfigError, match=text):
            TrainConfig(**kw)


def test_resume_refuses_other_options_and_records_only_what_was_used(tmp_path):
    out = tmp_path / "r"
    train(_cfg(tmp_path, "r", steps=2), say=lambda _m: None)
    recorded = (out / "config.toml").read_text()
    ckpt = out / "checkpoint-00000002.pt"
    before = ckpt.read_bytes()
    for kw, diffs in [
        ({"lr": 0.05}, ["lr 0.02 -> 0.05"]),
        ({"optimizer": "adam", "model": "mini"}, ["model 'tiny' -> 'mini'", "optimizer 'sm3' -> 'adam'"]),
        ({"seed": 1, "batch_size": 3}, ["batch_size 2 -> 3", "seed 0 -> 1"]),
    ]:
        with pytest.raises(ConfigError, match="cannot resume") as info:
            train(_cfg(tmp_path, "r", steps=4, **kw), resume=True, say=lambda _m: None)
        for d in diffs:
            assert d in str(info.value)
        assert (out / "config.toml").read_text() == recorded  # nothing recorded that was not used
        assert ckpt.read_bytes() == before and len(_rows(out)) == 2
    with pytest.raises(ConfigError, match="steps must be >= 2"):
        train(_cfg(tmp_path, "r", steps=1), resume=True, say=lambda _m: None)
    # a fresh run into a directory with checkpoints would prune them: refused, --resume is the way on
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        train(_cfg(tmp_path, "r", steps=2), say=lambda _m: None)
    # options that may change: steps, checkpointing, evaluation; the rest comes from OUT/config.toml
    cfg = load_config(resume=True, out=str(out), steps=3, keep=1, eval_every=1)
    assert (cfg.batch_size, cfg.seq_len, cfg.warmup_steps, cfg.lr) == (2, 16, 2, 0.02)
    result = train(cfg, resume=True, say=lambda _m: None)
    assert len(result["losses"]) == 3 and result["val"][-1][0] == 3
    assert "steps = 3" in (out / "config.toml").read_text()


def test_unfinished_first_checkpoint_write_is_removed_and_named(tmp_path):
    """A kill during the first checkpoint's write leaves ``checkpoint-*.pt.tmp``: removed, and the error says so."""
    out = tmp_path / "k"
    out.mkdir()
    (out / "checkpoint-00000002.pt.tmp").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(
        CheckpointError, match=r"checkpoint-00000002\.pt\.tmp was a write the run did not finish"
    ):
        train(_cfg(tmp_path, "k", steps=2), resume=True, say=lambda _m: None)
    assert not list(out.glob("*.tmp"))


def test_sigint_stops_with_a_checkpoint_like_sigterm(tmp_path):
    """Ctrl-C (SIGINT): a checkpoint after the current step, exit status 130, no traceback; resumable."""
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "memfit", "train", "--model", "tiny", "--batch-size", "2", "--seq-len", "16"]
    cmd += [
        "--warmup-steps",
        "2",
        "--checkpoint-every",
        "1000",
        "--steps",
        "100000",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # header + 2 steps
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    done = len(metrics.read_text().splitlines()) - 1
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"SIGINT: stopped after step {done} with a checkpoint" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{done:08d}.pt"]
    got = train(load_config(resume=True, out=str(out), steps=done + 1), resume=True, say=lambda _m: None)
    assert len(got["losses"]) == done + 1


def test_default_run_has_no_loss_spike(tmp_path):
    """The default ``memfit train`` (tiny, SM3, its default lr and warm-up) never rises above uniform guessing
    (ln 256) on its first 150 steps; SM3 at lr 0.1 went from 3.1 to 8.1 at step 51 and never recovered its pace."""
    losses = train(TrainConfig(out=str(tmp_path / "default"), steps=150), say=lambda _m: None)["losses"]
    assert max(losses) < math.log(256), max(losses)
    assert sum(losses[-10:]) / 10 < 3.0  # and it learns


def test_example_config_loads_and_docs_cover_every_option():
    """``examples/train.toml`` is a valid config; ``docs/train.md`` and ``--help`` name every option."""
    import dataclasses

    from memfit.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples" / "train.toml")
    assert cfg.optimizer in ("sm3", "sm3-bf16", "sm3-m0.9") and cfg.optimizer_args
    docs = (root / "docs" / "train.md").read_text()
    sub = build_parser()._subparsers._group_actions[0].choices["train"]  # the train subparser
    helps = {a.dest: a.help or "" for a in sub._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f"`{f.name}`" in docs, f.name
        assert f.name in helps and ("default" in helps[f.name] or f.name == "optimizer_args"), f.name


@pytest.mark.slow
def test_resumed_remat_run_checkpoints_the_uninterrupted_runs_rng_state(tmp_path, monkeypatch):
    """End to end for the RNG fix: a remat run stopped at step 2 and resumed (in a fresh process the first compile
    calibrates the device again) checkpoints at step 4 the RNG state and losses of a run never stopped."""
    import torch

    calibration = "memfit.remat.eager.costs._RATES"
    monkeypatch.setattr(calibration, {})
    ref = train(_cfg(tmp_path, "full", steps=4, remat_budget=1.0), say=lambda _m: None)["losses"]
    monkeypatch.setattr(calibration, {})
    train(_cfg(tmp_path, "cut", steps=2, remat_budget=1.0), say=lambda _m: None)
    monkeypatch.setattr(calibration, {})
    got = train(_cfg(tmp_path, "cut", steps=4, remat_budget=1.0), resume=True, say=lambda _m: None)["losses"]
    assert got == ref

    def rng(name):
        return torch.load(tmp_path / name / "checkpoint-00000004.pt", weights_only=False)["rng"]

    assert torch.equal(rng("cut"), rng("full"))
