"""The GPT: parameter counts against GPT-2's published sizes, causality, tied weights, import paths."""

import math

import pytest
import torch
import torch.nn.functional as F

from memfit.models import GPT, PRESETS, GPTConfig, get_model


@pytest.mark.parametrize(
    ("name", "published"),
    # Radford et al. 2019 / the HF model cards: 124M, 355M, 774M, 1558M parameters (tied embeddings)
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_gpt2_presets_have_the_published_parameter_counts(name, published):
    spec = PRESETS[name]
    with torch.device("meta"):
        model = spec.build()
    assert sum(p.numel() for p in model.parameters()) == published
    assert spec.gpt is not None and spec.gpt.n_params == published


def test_output_at_position_t_does_not_depend_on_later_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_sdpa_and_manual_attention_agree():
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16)
    torch.manual_seed(0)
    sdpa = GPT(cfg).double()
    manual = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, attention="manual")).double()
    manual.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 256, (3, 16))
    torch.testing.assert_close(sdpa(x), manual(x))


def test_attention_matches_a_float64_reference_written_from_the_equations():
    torch.manual_seed(1)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=5)
    model = GPT(cfg).double()
    attn = model.blocks[0].attn
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    q, k, v = (x @ attn.qkv.weight.T).split(8, dim=2)
    outs = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        s = q[0, :, sl] @ k[0, :, sl].T / math.sqrt(4)
        s = s + torch.triu(torch.full((5, 5), float("-inf"), dtype=torch.float64), diagonal=1)
        outs.append(torch.softmax(s, dim=-1) @ v[0, :, sl])
    ref = torch.cat(outs, dim=-1) @ attn.proj.weight.T
    torch.testing.assert_close(attn(x)[0], ref)


def test_output_layer_is_tied_to_the_embedding():
    torch.manual_seed(0)
    spec = PRESETS["tiny"]
    model = spec.build()
    x, y = spec.example_batch(2, 8)
    spec.loss_fn(model, (x, y)).backward()
    # the gradient of wte holds the output layer's contribution for every vocabulary row, not only the
    # rows of the tokens in x (all zeros here)
    assert (model.wte.weight.grad[1:].abs().sum(dim=1) > 0).all()
    h = model.ln_f(model.blocks[1](model.blocks[0](model.wte(x) + model.wpe(torch.arange(8)))))
    torch.testing.assert_close(model(x), h @ model.wte.weight.T)


def test_initial_loss_is_log_vocab():
    torch.manual_seed(0)
    spec = PRESETS["small"]
    model = spec.build()
    x = torch.randint(0, 256, (4, 32))
    loss = F.cross_entropy(model(x).reshape(-1, 256), torch.randint(0, 256, (4 * 32,)))
    assert abs(loss.item() - math.log(256)) < 0.1


def test_import_path_model_and_errors():
    spec = get_model("memfit.models:SmallCNN", input_shape=(3, 16, 16))
    model = spec.build()
    x, y = spec.example_batch(2)
    assert x.shape == (2, 3, 16, 16)
    assert spec.loss_fn(model, (x, y)).ndim == 0
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        get_model("nope")
    with pytest.raises(ValueError, match="input_shape"):
        get_model("memfit.models:SmallCNN")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="sequence length"):
        PRESETS["tiny"].example_batch(2, 65)


def test_cnn_preset_trains_one_step():
    spec = PRESETS["cnn"]
    torch.manual_seed(0)
    model = spec.build()
    x, y = spec.example_batch(4)
    x = torch.randn_like(x)
    loss = spec.loss_fn(model, (x, y))
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in model.parameters())
