"""The optimizers (llama_mini/train/optim.py): --optimizer muon against torch.optim.Muon and AdamW built by
hand, torch's Muon against the Newton-Schulz iteration written out, which parameters each one updates, and
the joint optimizer's state dict.

Tolerances. Our Muon step and torch's are the same kernels on the same tensors: compared bit for bit. The
written-out Newton-Schulz runs in float32 where torch's runs in bfloat16 (8 bits of mantissa, 3.9e-3
relative per rounding, over 5 iterations of 3 matmuls each): the two orthogonalized updates, entries of
magnitude about 1 / sqrt(columns), agree within 2.0e-2 of the largest entry (measured, both shapes);
`atol = 0.05 * largest` keeps a 2.5x margin and still fails a missing shape adjustment (measured 0.73 of
the largest entry: a factor sqrt(3) on the tall matrix), plain momentum in place of Nesterov's (0.21) or
one Newton-Schulz step too few (0.28).
"""

import io
import math

import pytest
import torch

from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer
from llama_mini.ops.lora import LoRASettings, apply_lora
from llama_mini.train import TrainConfig, make_optimizer
from llama_mini.train.optim import (
    JointOptimizer,
    check_optimizer,
    learning_rate,
    partition_for_muon,
    set_learning_rates,
)

pytestmark = pytest.mark.numerics

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
MUON = dict(optimizer="muon", lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=20, eval_interval=10,
            muon_lr=0.05, muon_momentum=0.9, muon_weight_decay=0.2, weight_decay=0.1)  # fmt: skip
BLOCK_MATRICES = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]  # fmt: skip


def model(args: ModelArgs = ARGS, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(args)


def give_gradients(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.randn(parameter.shape, generator=generator)


def test_muon_goes_to_the_blocks_matrices_and_adamw_to_the_rest():
    muon, adamw = partition_for_muon(model())
    assert muon == [f"layers.{i}.{name}.weight" for i in range(2) for name in BLOCK_MATRICES]
    norms = [f"layers.{i}.{name}.weight" for i in range(2) for name in ("attention_norm", "ffn_norm")]
    assert sorted(adamw) == sorted(["tok_embeddings.weight", "norm.weight", "output.weight", *norms])


def test_the_optimizers_groups_hold_those_parameters_with_their_settings():
    net = model()
    optimizer = make_optimizer(net, TrainConfig(**MUON), fused=False)
    names = {id(p): name for name, p in net.named_parameters()}
    muon_groups = [group for group in optimizer.param_groups if "ns_steps" in group]
    adamw_groups = [group for group in optimizer.param_groups if "betas" in group]
    assert len(muon_groups) == 1 and len(adamw_groups) == 2
    assert [names[id(p)] for p in muon_groups[0]["params"]] == partition_for_muon(net)[0]
    assert muon_groups[0]["lr"] == 0.05 and muon_groups[0]["momentum"] == 0.9
    assert muon_groups[0]["weight_decay"] == 0.2 and muon_groups[0]["nesterov"]
    decayed, vectors = adamw_groups
    assert sorted(names[id(p)] for p in decayed["params"]) == ["output.weight", "tok_embeddings.weight"]
    assert decayed["weight_decay"] == 0.1 and vectors["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in vectors["params"]) and len(vectors["params"]) == 5
    assert decayed["lr"] == 3e-3 and decayed["betas"] == (0.9, 0.95)


def test_adamw_alone_still_gets_every_trainable_parameter():
    net = model()
    optimizer = make_optimizer(net, TrainConfig(**{**MUON, "optimizer": "adamw"}), fused=False)
    assert type(optimizer) is torch.optim.AdamW
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, held)) == sorted(id(p) for p in net.parameters())
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]


def test_a_tied_output_layer_is_adamws_once():
    net = model(ModelArgs(**{**ARGS.to_dict(), "tie_embeddings": True}))
    muon, adamw = partition_for_muon(net)
    assert "tok_embeddings.weight" in adamw and "output.weight" not in muon + adamw  # one parameter
    make_optimizer(net, TrainConfig(**MUON), fused=False)  # no parameter twice


def test_lora_trains_its_adapters_with_muon_alone():
    net = model()
    apply_lora(net, LoRASettings(rank=4, alpha=8.0, dropout=0.0, targets=("wq", "wv", "w2")))
    muon, adamw = partition_for_muon(net)
    expected = [f"layers.{i}.{layer}.{ab}.weight" for i in range(2)
                for layer in ("attention.wq", "attention.wv", "feed_forward.w2") for ab in ("lora_A", "lora_B")]  # fmt: skip
    assert sorted(muon) == sorted(expected) and adamw == []
    optimizer = make_optimizer(net, TrainConfig(**MUON), fused=False)
    assert [type(part) for part in optimizer.parts] == [torch.optim.Muon]


def reference_optimizers(net: Transformer, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """torch.optim.Muon and AdamW, built here from the specification: Muon on the blocks' matrices, AdamW
    with decay on the other matrices, without on the vectors."""
    muon = [p for name, p in net.named_parameters() if name.startswith("layers.") and p.dim() == 2]
    rest = [p for name, p in net.named_parameters() if not (name.startswith("layers.") and p.dim() == 2)]
    return [
        torch.optim.Muon(muon, lr=config.muon_lr, weight_decay=config.muon_weight_decay,
                         momentum=config.muon_momentum, nesterov=True),  # fmt: skip
        torch.optim.AdamW(
            [{"params": [p for p in rest if p.dim() == 2], "weight_decay": config.weight_decay},
             {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
            lr=config.lr, betas=(config.beta1, config.beta2),
        ),
    ]  # fmt: skip


def test_three_steps_equal_torchs_muon_and_adamw_on_the_same_gradients():
    config = TrainConfig(**MUON)
    ours, theirs = model(), model()
    optimizer = make_optimizer(ours, config, fused=False)
    references = reference_optimizers(theirs, config)
    for step in range(3):
        set_learning_rates(optimizer, step, config)
        scale = learning_rate(step, config) / config.lr
        references[0].param_groups[0]["lr"] = config.muon_lr * scale
        for group in references[1].param_groups:
            group["lr"] = config.lr * scale
        give_gradients(ours, seed=step)
        give_gradients(theirs, seed=step)
        optimizer.step()
        for reference in references:
            reference.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(ours.layers[0].attention.wq.weight, model().layers[0].attention.wq.weight)


def newton_schulz(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Jordan et al.'s quintic Newton-Schulz iteration, in float32: X <- a X + (b A + c A^2) X, A = X X^T,
    from X = U / ||U||_F, on the wide orientation of U (its Gram matrix is the smaller one). Coefficients
    (3.4445, -4.7750, 2.0315), as torch.optim.Muon documents."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = update.shape[0] > update.shape[1]
    x = update.T if tall else update
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_torchs_muon_is_nesterov_momentum_newton_schulz_and_the_shape_adjustment(shape):
    """Two steps of torch.optim.Muon against the formula: B_t = mu B_(t-1) + g_t, U = g_t + mu B_t,
    W <- W (1 - lr wd) - lr sqrt(max(1, rows / cols)) NS(U)."""
    lr, momentum, decay = 0.05, 0.9, 0.2
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=generator)
    weight = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Muon([weight], lr=lr, momentum=momentum, weight_decay=decay, nesterov=True)
    expected, buffer = start.clone(), torch.zeros(shape)
    for _ in range(2):
        gradient = torch.randn(shape, generator=generator)
        weight.grad = gradient.clone()
        optimizer.step()
        buffer = momentum * buffer + gradient
        orthogonal = newton_schulz(gradient + momentum * buffer)
        expected = expected * (1 - lr * decay) - lr * math.sqrt(max(1, shape[0] / shape[1])) * orthogonal
    # compared on the updates (about 0.1 per entry), not on W, whose entries are 10x larger
    decayed = start * (1 - lr * decay) ** 2
    got_move, expected_move = weight.detach() - decayed, expected - decayed
    largest = expected_move.abs().max().item()
    torch.testing.assert_close(got_move, expected_move, rtol=0, atol=0.05 * largest)


def test_newton_schulz_flattens_the_singular_values():
    """What the iteration is for: singular values spread over two orders of magnitude come out near 1
    (Jordan et al.: within about [0.5, 1.5] after 5 steps), the singular vectors kept."""
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(96, 32, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator))
    spread = torch.logspace(0, -2, 32)  # 1 down to 0.01
    orthogonal = newton_schulz(left @ torch.diag(spread) @ right.T)
    after = torch.linalg.svdvals(orthogonal)
    assert after.min() > 0.5 and after.max() < 1.5
    # the same singular vectors: left^T O right is diagonal (O = left S' right^T)
    projected = left.T @ orthogonal @ right
    off_diagonal = projected - torch.diag(torch.diagonal(projected))
    assert off_diagonal.abs().max() < 1e-4


def test_the_joint_state_dict_round_trips_and_the_run_goes_on_identically():
    config = TrainConfig(**MUON)
    first, second = model(), model()
    optimizer = make_optimizer(first, config, fused=False)
    give_gradients(first, seed=0)
    optimizer.step()
    second.load_state_dict(first.state_dict())
    restored = make_optimizer(second, config, fused=False)
    saved = io.BytesIO()  # through a file, as a checkpoint is: loading aliases the tensors it is given
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    state_keys = {key for state in restored.state.values() for key in state}
    assert state_keys == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}
    for part in restored.parts:  # each part sees the loaded groups and state
        assert part.state is restored.state
        assert all(any(g is h for h in restored.param_groups) for g in part.param_groups)
    for net, opt in ((first, optimizer), (second, restored)):
        give_gradients(net, seed=1)
        opt.step()
    for (name, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_muon_follows_the_schedule_scaled_to_its_own_peak():
    config = TrainConfig(**MUON)
    optimizer = make_optimizer(model(), config, fused=False)
    assert isinstance(optimizer, JointOptimizer)
    for step in (0, 1, 7, 19, 30):
        set_learning_rates(optimizer, step, config)
        scale = learning_rate(step, config) / config.lr
        for group in optimizer.param_groups:
            peak = config.muon_lr if "ns_steps" in group else config.lr
            assert group["lr"] == pytest.approx(peak * scale)


def test_muon_without_torchs_muon_is_one_clear_line(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError, match=r"--optimizer muon needs torch >= 2.9 .*--optimizer adamw"):
        check_optimizer(TrainConfig(**MUON))
    check_optimizer(TrainConfig())  # AdamW needs nothing new


@pytest.mark.parametrize(
    "settings",
    [dict(muon_lr=0.0), dict(muon_momentum=1.0), dict(muon_weight_decay=-0.1), dict(optimizer="sgd")],
)
def test_invalid_muon_settings_are_refused(settings):
    with pytest.raises(ConfigError):
        TrainConfig(**{**MUON, **settings})
