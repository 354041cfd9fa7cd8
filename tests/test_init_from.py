"""Fine-tuning a pretrained model (train.py --init-from): a tiny Hugging Face Llama made by transformers with a
tokenizer.json trained here by `tokenizers`, read, tokenized, generated from and trained like the original,
and every mistake of the input refused in one line."""

import json
import random
import shutil

import pytest
import torch

import train as train_cli
from llama_mini.checkpoint import load_model, save_pretrained
from llama_mini.data import read_manifest
from llama_mini.errors import CheckpointError, ConfigError
from llama_mini.generation.decode import generate
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer
from llama_mini.tokenizer import Tokenizer
from llama_mini.train import TrainConfig, Trainer
from llama_mini.train.config import (
    FINE_TUNING_LR,
    FINE_TUNING_WARMUP,
    FINE_TUNING_WEIGHT_DECAY,
    FROM_SCRATCH_LR,
    LORA_LR,
)
from llama_mini.train.run_folder import METRICS

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

HF_SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: wk's rows are permuted with 2 heads, wq's with 4
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
TEXTS = [
    "The king speaks of the crown.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Numbers 12345 and émigré café — naïve 🙂 text",
    "",
]


def corpus(documents: int, seed: int, words: list[str]) -> list[str]:
    """Documents of sentences drawn from `words`: structure a model can learn, no downloads."""
    rng = random.Random(seed)
    return [
        "\n".join(" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(30))
        for _ in range(documents)
    ]


PRETRAINING_WORDS = ["the", "king", "a", "fool", "speaks", "of", "crown", "rose", "storm", "night"]
FINE_TUNING_WORDS = ["the", "ship", "sails", "on", "a", "calm", "sea", "under", "grey", "sky"]


def write_corpus(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for index, text in enumerate(texts):
        (folder / f"doc{index:02d}.txt").write_text(text)
    return folder


def train_byte_level_bpe(texts: list[str], vocab_size: int = 320):
    """A byte-level BPE with Llama's <s> / </s>, bos added by its post-processor, as Llama 3's adds its own."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return tokenizer


def save_hf_llama(folder, tokenizer_object, seed: int = 0, **shape) -> None:
    """A random-weight LlamaForCausalLM and its tokenizer, saved by transformers itself."""
    torch.manual_seed(seed)
    vocab_size = tokenizer_object.get_vocab_size()
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **{**HF_SHAPE, **shape}
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_llama")
    texts = corpus(12, 0, PRETRAINING_WORDS) + corpus(12, 1, FINE_TUNING_WORDS) + TEXTS
    save_hf_llama(folder, train_byte_level_bpe(texts))
    return folder


@pytest.fixture(scope="module")
def fine_tuning_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("sea"), corpus(16, 2, FINE_TUNING_WORDS))


def fine_tuning_config(data, out, init_from, **overrides) -> TrainConfig:
    settings = dict(
        data=str(data),
        out=str(out),
        init_from=str(init_from),
        max_steps=6,
        batch_size=4,
        eval_interval=3,
        eval_steps=2,
        log_interval=1,
        sample_tokens=0,
        device="cpu",
    )
    return TrainConfig(**{**settings, **overrides})


def stop_after(trainer: Trainer, steps: int) -> None:
    """Make `trainer` stop (save and return, as after Ctrl-C) once `steps` steps are done."""
    original = trainer.train_step

    def train_step(step):
        loss = original(step)
        trainer.stop_requested = step + 1 == steps
        return loss

    trainer.train_step = train_step


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------- the HF model as is


def test_our_tokenization_equals_transformers(hf_llama):
    ours = Tokenizer(hf_llama)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_llama)
    for text in TEXTS:
        assert ours.encode(text, bos=ours.add_bos) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == theirs.decode(
            theirs(text)["input_ids"], skip_special_tokens=True
        )


def test_our_greedy_generation_equals_transformers_generate(hf_llama):
    model = load_model(hf_llama)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_llama).eval()
    tokenizer = Tokenizer(hf_llama)
    prompt = tokenizer.encode("The king speaks", bos=True)
    ours = generate(model, [prompt], max_new_tokens=24, temperature=0.0, eos_id=None)[0]
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert ours == theirs


# ------------------------------------------------------------------------------------- fine-tuning it


def test_fine_tuning_lowers_the_loss_and_the_result_loads_in_transformers(
    hf_llama, fine_tuning_corpus, tmp_path
):
    config = fine_tuning_config(
        fine_tuning_corpus, tmp_path / "run", hf_llama, max_steps=8, eval_interval=8, lr=3e-3
    )
    trainer = Trainer(config, show_progress=False)
    before = trainer.evaluate()["val_loss"]
    summary = trainer.run()
    assert summary.val_loss < before - 0.5  # the sea corpus is learned: 8 steps, a big drop
    best = tmp_path / "run" / "best"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(best).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(best)
    ids = hf_tokenizer("The ship sails on a calm sea")["input_ids"]
    assert ids == Tokenizer(best).encode("The ship sails on a calm sea", bos=True)
    with torch.no_grad():
        ours = load_model(best)(torch.tensor([ids]))
        torch.testing.assert_close(hf_model(torch.tensor([ids])).logits, ours, rtol=1e-5, atol=1e-5)


def test_fine_tuning_starts_from_the_checkpoints_weights(hf_llama, fine_tuning_corpus, tmp_path):
    trainer = Trainer(fine_tuning_config(fine_tuning_corpus, tmp_path / "run", hf_llama), show_progress=False)
    pretrained = load_model(hf_llama)
    for name, tensor in pretrained.state_dict().items():
        assert torch.equal(trainer.raw_model.state_dict()[name], tensor.float()), name


def test_the_corpus_is_prepared_with_the_checkpoints_tokenizer(hf_llama, fine_tuning_corpus, tmp_path):
    trainer = Trainer(fine_tuning_config(fine_tuning_corpus, tmp_path / "run", hf_llama), show_progress=False)
    assert trainer.config.tokenizer == str(hf_llama / "tokenizer.json")
    assert trainer.tokenizer.sha256 == Tokenizer(hf_llama).sha256
    assert not (tmp_path / "run" / "tokenizer.model").exists()  # none was trained
    manifest = read_manifest(tmp_path / "run" / "data")
    assert manifest["tokenizer_sha256"] == Tokenizer(hf_llama).sha256  # the data record which tokenizer


def test_fine_tuning_defaults_are_a_lower_peak_a_short_warmup_and_less_weight_decay():
    scratch, full, lora = TrainConfig(), TrainConfig(init_from="m"), TrainConfig(init_from="m", lora_rank=4)
    assert (scratch.lr, full.lr, lora.lr) == (FROM_SCRATCH_LR, FINE_TUNING_LR, LORA_LR)
    assert full.warmup_steps == lora.warmup_steps == FINE_TUNING_WARMUP < scratch.warmup_steps
    assert full.min_lr == pytest.approx(full.lr / 10) and scratch.min_lr == pytest.approx(scratch.lr / 100)
    assert full.weight_decay == lora.weight_decay == FINE_TUNING_WEIGHT_DECAY < scratch.weight_decay
    assert TrainConfig(init_from="m", lr=1e-2, warmup_steps=3).lr == 1e-2  # given values win


def test_help_documents_the_fine_tuning_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: nothing hyphenated by the wrapping
    assert train_cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--init-from" in text and "--lora-rank" in text and "--lora-targets" in text
    assert (
        f"fine-tuning with --init-from defaults to {FINE_TUNING_LR:g} ({LORA_LR:g} with --lora-rank)" in text
    )
    assert f"({FINE_TUNING_WARMUP} when fine-tuning with --init-from), at most 1/10 of --max-steps" in text


def test_resume_never_reads_the_init_checkpoint_again(hf_llama, fine_tuning_corpus, tmp_path):
    copy = tmp_path / "pretrained"
    shutil.copytree(hf_llama, copy)
    whole = fine_tuning_config(fine_tuning_corpus, tmp_path / "whole", copy)
    Trainer(whole, show_progress=False).run()

    broken = fine_tuning_config(fine_tuning_corpus, tmp_path / "broken", copy)
    trainer = Trainer(broken, show_progress=False)
    stop_after(trainer, 3)
    assert trainer.run().interrupted
    shutil.rmtree(copy)  # gone: resuming must not need it, nor reload it over the trained weights
    resumed = Trainer(TrainConfig(out=str(tmp_path / "broken")), resume=True, show_progress=False)
    assert resumed.step == 3
    resumed.run()

    def losses(out):
        lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
        return [(line["step"], line.get("loss", line.get("val_loss"))) for line in lines]

    assert losses(tmp_path / "broken") == losses(tmp_path / "whole")


def test_init_from_a_run_folder_reads_its_best_checkpoint(fine_tuning_corpus, tmp_path, sentencepiece_model):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, multiple_of=16, max_seq_len=32, vocab_size=64)
    torch.manual_seed(0)
    save_pretrained(Transformer(args), tmp_path / "pre" / "best", tokenizer_path=sentencepiece_model)
    trainer = Trainer(
        fine_tuning_config(fine_tuning_corpus, tmp_path / "run", tmp_path / "pre"), show_progress=False
    )
    assert trainer.model_args == args
    assert trainer.tokenizer.sha256 == Tokenizer(sentencepiece_model).sha256


def test_init_from_a_meta_folder_reads_its_weights_and_tokenizer(
    fine_tuning_corpus, tmp_path, sentencepiece_model
):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, multiple_of=16, max_seq_len=32, vocab_size=64)
    torch.manual_seed(0)
    model = Transformer(args)
    folder = tmp_path / "meta"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "consolidated.00.pth")  # Meta's names and RoPE layout are ours
    params = dict(dim=32, n_layers=1, n_heads=2, vocab_size=-1, multiple_of=16, norm_eps=1e-5, max_seq_len=32)
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copy(sentencepiece_model, folder / "tokenizer.model")
    trainer = Trainer(fine_tuning_config(fine_tuning_corpus, tmp_path / "run", folder), show_progress=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(trainer.raw_model.state_dict()[name], tensor), name
    assert trainer.tokenizer.sha256 == Tokenizer(sentencepiece_model).sha256


def test_max_seq_len_and_dropout_may_differ_from_the_checkpoint(hf_llama, fine_tuning_corpus, tmp_path):
    config = fine_tuning_config(fine_tuning_corpus, tmp_path / "run", hf_llama)
    trainer = Trainer(config, {"max_seq_len": 16, "dropout": 0.1, "dim": 32}, show_progress=False)
    assert (trainer.model_args.max_seq_len, trainer.model_args.dropout, trainer.model_args.dim) == (
        16,
        0.1,
        32,
    )


# ------------------------------------------------------------------------------------- mistakes, one line each


def run_cli(capsys, *argv) -> str:
    assert train_cli.main([*argv, "--device", "cpu", "--max-steps", "1", "--sample-tokens", "0"]) == 2
    return one_line_error(capsys)


def test_shape_flags_contradicting_the_checkpoint_are_refused(hf_llama, fine_tuning_corpus, tmp_path, capsys):
    err = run_cli(capsys, "--init-from", str(hf_llama), "--data", str(fine_tuning_corpus), "--out",
                  str(tmp_path / "r"), "--dim", "64", "--n-layers", "2")  # fmt: skip
    assert "--dim 64 (the checkpoint has 32)" in err and "contradicts --init-from" in err
    assert "--n-layers" not in err  # it agrees


def test_a_folder_without_weights_is_refused(hf_llama, fine_tuning_corpus, tmp_path, capsys):
    folder = tmp_path / "no_weights"
    shutil.copytree(hf_llama, folder)
    (folder / "model.safetensors").unlink()
    err = run_cli(
        capsys, "--init-from", str(folder), "--data", str(fine_tuning_corpus), "--out", str(tmp_path / "r")
    )
    assert "--init-from" in err and "weights are missing" in err


def test_a_folder_that_does_not_exist_is_refused(fine_tuning_corpus, tmp_path, capsys):
    err = run_cli(capsys, "--init-from", str(tmp_path / "nowhere"), "--data", str(fine_tuning_corpus),
                  "--out", str(tmp_path / "r"))  # fmt: skip
    assert "does not exist" in err


def test_a_folder_without_tokenizer_is_refused(hf_llama, fine_tuning_corpus, tmp_path, capsys):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(hf_llama, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    err = run_cli(
        capsys, "--init-from", str(folder), "--data", str(fine_tuning_corpus), "--out", str(tmp_path / "r")
    )
    assert "has no tokenizer" in err and "--tokenizer" in err
    assert not (tmp_path / "r" / "data").exists()  # refused before the corpus was prepared


def test_a_tokenizer_of_another_vocabulary_is_refused(
    hf_llama, fine_tuning_corpus, tmp_path, capsys, sentencepiece_model
):
    err = run_cli(capsys, "--init-from", str(hf_llama), "--tokenizer", str(sentencepiece_model), "--data",
                  str(fine_tuning_corpus), "--out", str(tmp_path / "r"))  # fmt: skip
    assert "has 64 tokens but the model of --init-from" in err and "--tokenizer" in err


def test_lora_targets_that_do_not_exist_are_refused(
    fine_tuning_corpus, tmp_path, capsys, sentencepiece_model
):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, multiple_of=16, max_seq_len=32, vocab_size=64, ffn="relu")
    save_pretrained(Transformer(args), tmp_path / "relu", tokenizer_path=sentencepiece_model)
    err = run_cli(capsys, "--init-from", str(tmp_path / "relu"), "--lora-rank", "2", "--lora-targets", "wq,w3",
                  "--data", str(fine_tuning_corpus), "--out", str(tmp_path / "r"))  # fmt: skip
    assert "--lora-targets w3: no such layer" in err and "w1, w2" in err
    err = run_cli(capsys, "--init-from", str(tmp_path / "relu"), "--lora-rank", "2", "--lora-targets", "wq,q_proj",
                  "--data", str(fine_tuning_corpus), "--out", str(tmp_path / "r2"))  # fmt: skip
    assert "unknown 'q_proj'" in err


def test_lora_without_init_from_is_refused():
    with pytest.raises(ConfigError, match="pass --init-from"):
        TrainConfig(lora_rank=4)


def test_preset_with_init_from_is_refused():
    with pytest.raises(ConfigError, match="drop --preset"):
        TrainConfig(init_from="m", preset="stories15m")


def test_resume_refuses_another_init_from(hf_llama, fine_tuning_corpus, tmp_path):
    config = fine_tuning_config(fine_tuning_corpus, tmp_path / "run", hf_llama, max_steps=1, eval_interval=1)
    Trainer(config, show_progress=False).run()
    with pytest.raises(ConfigError, match="--init-from .* differs from the resumed run's"):
        Trainer(TrainConfig(out=str(tmp_path / "run")), resume=True,
                resume_overrides={"init_from": str(tmp_path / "else")})  # fmt: skip


def test_checkpoint_errors_name_init_from(tmp_path):
    (tmp_path / "empty").mkdir()
    config = TrainConfig(init_from=str(tmp_path / "empty"), out=str(tmp_path / "r"), device="cpu")
    with pytest.raises(CheckpointError, match="^--init-from: "):
        Trainer(config, show_progress=False)
