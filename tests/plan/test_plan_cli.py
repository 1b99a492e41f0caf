"""``memfit plan`` for a model of one's own: import paths, HF configs, and one clear line for each bad input."""

import json
from pathlib import Path

import pytest
import torch

from memfit.cli import main
from memfit.memory import track
from memfit.plan import make_optimizer

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def _user(*extra):
    return [
        "plan", "--model", "plan_user_model:make_model", "--loss", "plan_user_model:loss",
        "--batch", "plan_user_model:make_batch", "--remat", "none", "--optimizers", "adam", *extra,
    ]  # fmt: skip


def _measured(model, loss_fn, batch, optimizer="adam"):
    opt = make_optimizer(optimizer, model.parameters())

    def step():
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with track(model, opt, inputs=batch) as t:
        step()
    return t.report.total_peak_bytes


def test_import_path_model_with_loss_and_batch_matches_a_real_step(capsys):
    import plan_user_model as u

    assert main([*_user("--batch-size", "6", "--json")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batch_size"] == 6 and data["model"] == "plan_user_model:make_model"
    (row,) = data["rows"]
    assert "Adam" in row["settings"] and "for-loop" in row["settings"]
    torch.manual_seed(0)
    batch = {k: torch.cat([v] * 3) for k, v in u.make_batch().items()}  # the example (2, 16) scaled to 6
    measured = _measured(u.make_model(), u.loss, batch)
    assert abs(row["peak_bytes"] / measured - 1) < 0.03, (row["peak_bytes"], measured)


def test_hf_config_file_plans_the_models_own_loss(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = {
        "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    }  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    args = [
        "plan",
        "--model",
        f"hf:{path}",
        "--batch",
        "2x16",
        "--remat",
        "none",
        "--optimizers",
        "adam",
        "--json",
    ]
    assert main(args) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    )
    ids = torch.randint(0, 128, (2, 16))
    measured = _measured(model, lambda m, b: m(**b).loss, {"input_ids": ids, "labels": ids})
    assert abs(row["peak_bytes"] / measured - 1) < 0.03, (row["peak_bytes"], measured)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "torch.nn:Linear", "--batch", "8"], "needs --loss package.module:fn"),
        (["--model", "torch.nn:Linear", "--batch", "8", "--input-shape", "16"], "raised TypeError"),
        (
            [*_user()[1:3], "--loss", "plan_user_model:loss", "--batch", "8"],
            "--batch is package.module:make_batch",
        ),
        (
            ["--model", "no_such_pkg.mod:f", "--loss", "x:y", "--batch", "x:z"],
            "cannot import 'no_such_pkg.mod'",
        ),
        (["--model", "plan_user_model:nope", "--loss", "x:y", "--batch", "x:z"], "has no attribute 'nope'"),
        (["--model", "plan_user_model:not_callable", "--loss", "x:y", "--batch", "x:z"], "not callable"),
        (
            [
                "--model",
                "plan_user_model:raising_factory",
                "--loss",
                "plan_user_model:loss",
                "--batch",
                "plan_user_model:make_batch",
            ],
            "raised RuntimeError: no weights here",
        ),
        (
            [
                "--model",
                "plan_user_model:make_model",
                "--loss",
                "plan_user_model:loss",
                "--batch",
                "plan_user_model:bad_batch",
            ],
            "leaf 1 is a str",
        ),
        (
            [
                "--model",
                "plan_user_model:make_model",
                "--loss",
                "plan_user_model:loss",
                "--batch",
                "plan_user_model:raising_batch",
            ],
            "raised OSError: dataset not found",
        ),
        (
            [
                "--model",
                "plan_user_model:make_model",
                "--loss",
                "plan_user_model:vector_loss",
                "--batch",
                "plan_user_model:make_batch",
            ],
            "must return a scalar tensor, got shape (2, 16)",
        ),
        (
            ["--model", "hf:no_such_model_type", "--batch", "2x8"],
            "hf:no_such_model_type: cannot make a config",
        ),
        (["--model", "tiny", "--batch", "2x16", "--precision", "fp8"], None),  # argparse: exit 2 itself
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, capsys):
    args = ["plan", *argv, "--remat", "none", "--optimizers", "adam"]
    if message is None:
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        return
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("memfit plan: ") and err.count("\n") == 1, err
    assert message in err, err
