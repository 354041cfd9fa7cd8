"""LoRA (llama_mini/ops/lora.py): the adapter's formula, freezing, merging, and LoRA training runs: only the
adapters change, resume is exact, checkpoints hold the merged model and the adapter, convert merges it."""

import json
import random

import pytest
import torch

from llama_mini.checkpoint import load_model, save_pretrained
from llama_mini.checkpoint.peft import ADAPTER_CONFIG_FILE, ADAPTER_FOLDER, ADAPTER_WEIGHTS_FILE, merged_model
from llama_mini.convert import convert
from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer
from llama_mini.ops.lora import (
    LoRALinear,
    LoRASettings,
    apply_lora,
    lora_modules,
    merge_lora,
    parse_lora_targets,
    trainable_parameters,
)
from llama_mini.tokenizer import train_tokenizer
from llama_mini.train import TrainConfig, Trainer, make_optimizer
from llama_mini.train.initial_model import LORA_BASE
from llama_mini.train.run_folder import METRICS

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
SHAPE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=32)


def tiny_model(seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(vocab_size=64, **{**SHAPE, **changes})).eval()


def with_random_adapters(model: Transformer, settings: LoRASettings, seed: int = 1) -> Transformer:
    """`model` with adapters whose B is not zero, as after training, so that they change the logits."""
    apply_lora(model, settings)
    generator = torch.Generator().manual_seed(seed)
    for module in lora_modules(model).values():
        module.lora_B.weight.data = torch.randn(module.lora_B.weight.shape, generator=generator) * 0.1
    return model


def tokens(vocab_size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the conversion


def test_a_zero_initialised_adapter_leaves_the_logits_unchanged():
    model = tiny_model()
    x = tokens()
    with torch.no_grad():
        before = model(x)
        apply_lora(model, LoRASettings(rank=4, alpha=8.0, targets=ALL_TARGETS))
        assert torch.equal(model(x), before)  # B = 0: the update adds exact zeros


def test_the_adapted_layer_computes_w_x_plus_alpha_over_r_b_a_x():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=False).double()
    layer = LoRALinear(base, rank=3, alpha=6.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16, dtype=torch.float64)
    a, b, w = layer.lora_A.weight, layer.lora_B.weight, base.weight
    expected = x @ w.T + (6.0 / 3) * x @ a.T @ b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert a.shape == (3, 16) and b.shape == (24, 3)


def test_apply_lora_freezes_everything_but_the_adapters():
    model = tiny_model()
    names = apply_lora(model, LoRASettings(rank=2, alpha=4.0, targets=("wq", "wv", "w2")))
    assert names == [f"layers.{i}.{part}" for i in range(2)
                     for part in ("attention.wq", "attention.wv", "feed_forward.w2")]  # fmt: skip
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{m}.weight" for name in names for m in "AB"}
    # r (in + out) per layer: wq 2 (32 + 32), wv 2 (32 + 16) (2 kv heads of 8), w2 2 (96 + 32); two layers
    assert trainable_parameters(model) == 2 * (128 + 96 + 256)


def test_the_optimizer_holds_only_the_adapters():
    model = tiny_model()
    apply_lora(model, LoRASettings(rank=2, alpha=4.0))
    optimizer = make_optimizer(model, TrainConfig(), fused=False)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapters = {id(m.lora_A.weight) for m in lora_modules(model).values()}
    adapters |= {id(m.lora_B.weight) for m in lora_modules(model).values()}
    assert held == adapters


@pytest.mark.parametrize("tie", [False, True])
def test_the_merged_model_gives_the_adapted_models_logits(tie):
    model = with_random_adapters(
        tiny_model(tie_embeddings=tie), LoRASettings(rank=4, alpha=8.0, targets=ALL_TARGETS)
    )
    x = tokens()
    with torch.no_grad():
        adapted = model(x)
        merged = merged_model(model)
        # float32 weights, one rounding of W + s B A per entry: logits agree to a few float32 ulps
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)
        assert lora_modules(model)  # the model itself keeps its adapters (training goes on)
        torch.testing.assert_close(merge_lora(model)(x), adapted, rtol=1e-5, atol=1e-5)


def test_merge_lora_puts_plain_linear_layers_back():
    model = with_random_adapters(tiny_model(), LoRASettings(rank=2, alpha=2.0))
    merge_lora(model)
    assert not lora_modules(model)
    assert type(model.layers[0].attention.wq) is torch.nn.Linear
    assert set(model.state_dict()) == set(tiny_model().state_dict())


def test_a_target_the_model_lacks_is_refused():
    with pytest.raises(
        ConfigError, match="--lora-targets w3: no such layer in this model .*'relu' has w1, w2"
    ):
        apply_lora(tiny_model(ffn="relu"), LoRASettings(rank=2, alpha=2.0, targets=("wq", "w3")))


def test_target_names_are_checked_and_put_in_order():
    assert parse_lora_targets("w2, wq,wk") == ("wq", "wk", "w2")
    for text, problem in (("wq,q_proj", "unknown 'q_proj'"), ("wq,wq", "twice"), ("", "none given")):
        with pytest.raises(ConfigError, match=problem):
            parse_lora_targets(text)


# ------------------------------------------------------------------------------------------ LoRA runs

WORDS = ["the", "ship", "sails", "on", "a", "calm", "sea", "under", "grey", "sky", "and", "wind"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A llama_mini checkpoint (random weights, GQA, a SentencePiece tokenizer) and a corpus to tune it on."""
    root = tmp_path_factory.mktemp("lora")
    rng = random.Random(0)
    texts = [
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(9)) + "." for _ in range(30)) for _ in range(16)
    ]
    corpus = root / "corpus"
    corpus.mkdir()
    for index, text in enumerate(texts):
        (corpus / f"doc{index:02d}.txt").write_text(text)
    tokenizer = train_tokenizer(texts, root / "tokenizer.model", vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=tokenizer.vocab_size, **SHAPE))
    save_pretrained(model, root / "model", tokenizer_path=root / "tokenizer.model")
    return root / "model", corpus


def lora_config(pretrained, out, **overrides) -> TrainConfig:
    folder, corpus = pretrained
    settings = dict(
        data=str(corpus), out=str(out), init_from=str(folder), lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
        lora_targets="wq,wk,wv,wo,w1,w2,w3", max_steps=6, batch_size=4, eval_interval=3, eval_steps=2,
        log_interval=1, sample_tokens=0, device="cpu", lr=1e-2,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def lora_run(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run") / "run"
    trainer = Trainer(lora_config(pretrained, out), show_progress=False)
    before = trainer.evaluate()["val_loss"]
    summary = trainer.run()
    return trainer, out, before, summary


def test_lora_training_changes_only_the_adapters(pretrained, lora_run):
    trainer, _, before, summary = lora_run
    base = load_model(pretrained[0]).state_dict()
    for name, tensor in trainer.raw_model.state_dict().items():
        if ".lora_" in name:
            continue
        assert torch.equal(tensor, base[name.replace(".base.", ".")]), name  # bit for bit: frozen
    assert all(m.lora_B.weight.abs().max() > 0 for m in lora_modules(trainer.raw_model).values())
    assert summary.val_loss < before  # and the adapters learned something
    assert summary.trainable_parameters == trainable_parameters(trainer.raw_model)


def test_lora_run_keeps_its_frozen_base_exactly(pretrained, lora_run):
    _, out, _, _ = lora_run
    base = load_model(out / LORA_BASE).state_dict()
    for name, tensor in load_model(pretrained[0]).state_dict().items():
        assert torch.equal(base[name], tensor), name


def test_lora_checkpoint_is_the_fine_tuned_model_with_its_adapter_beside(lora_run):
    trainer, out, _, _ = lora_run
    x = tokens(trainer.model_args.vocab_size)
    with torch.no_grad():
        adapted = trainer.raw_model.eval()(x)
        loaded = load_model(out)  # what generate.py --checkpoint RUN loads: best/
        torch.testing.assert_close(loaded(x), adapted, rtol=1e-5, atol=1e-5)
    for checkpoint in (out / "best", out / "step-0000006"):
        assert (checkpoint / ADAPTER_FOLDER / ADAPTER_CONFIG_FILE).is_file()
        assert (checkpoint / ADAPTER_FOLDER / ADAPTER_WEIGHTS_FILE).is_file()
        assert not (checkpoint / ADAPTER_CONFIG_FILE).exists()  # transformers would apply it a second time
    named = json.loads((out / "best" / ADAPTER_FOLDER / ADAPTER_CONFIG_FILE).read_text())[
        "base_model_name_or_path"
    ]
    assert named == str((out / LORA_BASE).resolve())


def test_peft_applies_a_lora_runs_adapter_to_its_base_as_we_do(lora_run):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    trainer, out, _, _ = lora_run
    base = transformers.AutoModelForCausalLM.from_pretrained(out / LORA_BASE)
    model = peft.PeftModel.from_pretrained(base, out / "step-0000006" / ADAPTER_FOLDER).eval()
    x = tokens(trainer.model_args.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, trainer.raw_model.eval()(x), rtol=1e-5, atol=1e-5)


def test_convert_merges_a_runs_adapter_into_a_plain_hugging_face_folder(lora_run, tmp_path):
    trainer, out, _, _ = lora_run
    summary = convert(out / "step-0000006" / ADAPTER_FOLDER, tmp_path / "merged")
    assert "LoRA adapter merged into" in summary
    assert not (tmp_path / "merged" / ADAPTER_CONFIG_FILE).exists()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    x = tokens(trainer.model_args.vocab_size)
    with torch.no_grad():
        expected = trainer.raw_model.eval()(x)
        torch.testing.assert_close(load_model(tmp_path / "merged")(x), expected, rtol=1e-5, atol=1e-5)
        convert(out, tmp_path / "from_run")  # the run folder: its best/ holds the merged model already
        assert not (tmp_path / "from_run" / ADAPTER_FOLDER).exists()
        torch.testing.assert_close(load_model(tmp_path / "from_run")(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_run_resumes_exactly(pretrained, tmp_path):
    whole = Trainer(lora_config(pretrained, tmp_path / "whole"), show_progress=False)
    whole.run()
    broken = Trainer(lora_config(pretrained, tmp_path / "broken"), show_progress=False)
    original = broken.train_step

    def stop_after_two(step):
        loss = original(step)
        broken.stop_requested = step == 1
        return loss

    broken.train_step = stop_after_two
    assert broken.run().interrupted
    resumed = Trainer(TrainConfig(out=str(tmp_path / "broken")), resume=True, show_progress=False)
    assert resumed.step == 2
    resumed.run()

    def metrics(out):
        lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
        return [(line["type"], line["step"], line.get("loss"), line.get("val_loss")) for line in lines]

    assert metrics(tmp_path / "broken") == metrics(tmp_path / "whole")  # dropout included: bit for bit
    for name, tensor in whole.raw_model.state_dict().items():
        assert torch.equal(resumed.raw_model.state_dict()[name], tensor), name


def test_resume_refuses_another_lora_rank(lora_run):
    _, out, _, _ = lora_run
    with pytest.raises(ConfigError, match="--lora-rank 8 differs from the resumed run's 4"):
        Trainer(TrainConfig(out=str(out)), resume=True, resume_overrides={"lora_rank": 8})
