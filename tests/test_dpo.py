"""Preference tuning (train.py --dpo): the loss equals TRL's DPOTrainer (loss and gradients, sigmoid and IPO),
is ln 2 with rewards 0 while the policy is the reference, the pairs are encoded and laid out with the loss on
the answers only, bad records are one line naming file and line, and end to end a tiny Hugging Face chat model
is tuned with full weights and with LoRA, resumes exactly, and leaves ordinary checkpoints."""

import json
import math
import random
import re
import warnings

import numpy as np
import pytest
import torch
from test_chat_sft import ANSWERS, CHATML_TEMPLATE, TINY_LLAMA, byte_level_bpe, save_tiny_llama, write_jsonl

import train as train_cli
from llama_mini.checkpoint import load_model
from llama_mini.checkpoint.peft import ADAPTER_FOLDER
from llama_mini.data.preferences import encode_pair, preference_records, prepare_preferences
from llama_mini.errors import ConfigError, DataError
from llama_mini.ops.lora import LoRASettings, adapters_disabled, apply_lora, lora_modules
from llama_mini.ops.loss import IGNORE_INDEX
from llama_mini.ops.preference import PreferenceLoss, preference_loss, sequence_log_probs
from llama_mini.tokenizer import Tokenizer, encode_chat, render_chat
from llama_mini.train import TrainConfig, Trainer
from llama_mini.train.data_feed import shared_data_folder, shared_preference_folder
from llama_mini.train.run_folder import METRICS

transformers = pytest.importorskip("transformers")


def preference_pairs(count: int, seed: int = 0) -> list[dict]:
    """Questions about four topics; chosen is the topic's answer, rejected another topic's."""
    rng = random.Random(seed)
    records = []
    for number in range(count):
        topic = rng.choice(list(ANSWERS))
        wrong = rng.choice([other for other in ANSWERS if other != topic])
        records.append({
            "prompt": [{"role": "user", "content": f"Tell me {number} about the {topic}."}],
            "chosen": [{"role": "assistant", "content": ANSWERS[topic]}],
            "rejected": [{"role": "assistant", "content": ANSWERS[wrong]}],
        })  # fmt: skip
    return records


def texts_of(records: list[dict]) -> list[str]:
    return [m["content"] for r in records for m in r["prompt"] + r["chosen"] + r["rejected"]] * 3


@pytest.fixture(scope="module")
def hf_chat_model(tmp_path_factory):
    """A tiny random LlamaForCausalLM with a ChatML tokenizer, saved by transformers: (folder, records)."""
    folder = tmp_path_factory.mktemp("dpo_hf")
    records = preference_pairs(40)
    save_tiny_llama(folder, texts_of(records), CHATML_TEMPLATE)
    return folder, records


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------


def test_sequence_log_probs_sum_only_the_counted_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [1, 2, 3, 4, 5]])
    summed, counts = sequence_log_probs(logits, targets)
    log_probs = torch.log_softmax(logits, dim=-1)
    expected0 = log_probs[0, 1, 3] + log_probs[0, 2, 4]
    expected1 = sum(log_probs[1, t, v] for t, v in enumerate([1, 2, 3, 4, 5]))
    torch.testing.assert_close(summed, torch.stack([expected0, expected1]))
    assert counts.tolist() == [2, 5]


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_the_loss_matches_the_formulas_written_out(kind):
    policy = torch.tensor([-3.0, -5.0, -4.0, -2.0])  # chosen 0, 1; rejected 0, 1
    reference = torch.tensor([-3.5, -4.0, -4.5, -2.5])
    lengths = torch.tensor([2.0, 4.0, 3.0, 1.0])
    beta = 0.2
    values = preference_loss(policy, reference, lengths, beta, kind)
    chosen = torch.tensor([0.5, -1.0])
    rejected = torch.tensor([0.5, 0.5])
    if kind == "sigmoid":
        expected = torch.log1p(torch.exp(-beta * (chosen - rejected))).mean()
    else:
        expected = (
            (chosen / torch.tensor([2.0, 4.0]) - rejected / torch.tensor([3.0, 1.0]) - 1 / (2 * beta)) ** 2
        ).mean()
    torch.testing.assert_close(values[0], expected)
    torch.testing.assert_close(
        values[1:], torch.tensor([0.0, -0.15, -0.05, 0.1])
    )  # accuracy, margin, rewards


def tiny_model(seed: int = 0):
    from llama_mini.model.args import ModelArgs
    from llama_mini.model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(
        ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=16)
    )


def pair_rows(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (4, 12), generator=generator)
    y = torch.randint(0, 50, (4, 12), generator=generator)
    y[:, :5] = IGNORE_INDEX  # the prompt
    y[1, 10:] = IGNORE_INDEX  # padding
    return x, y


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_the_loss_is_ln2_and_the_rewards_zero_while_the_policy_is_the_reference(kind):
    model = tiny_model()
    x, y = pair_rows()
    with torch.no_grad():
        reference, _ = sequence_log_probs(model(x), y)
    values = PreferenceLoss(model, beta=0.1, kind=kind)(x, y, reference)
    expected = math.log(2) if kind == "sigmoid" else (1 / (2 * 0.1)) ** 2
    torch.testing.assert_close(values[0].item(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values[2:], torch.zeros(3), rtol=0, atol=1e-6)


@pytest.mark.slow  # importing TRL takes seconds
@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_loss_and_gradients_equal_trls_dpo_trainer(tmp_path, kind):
    """TRL's own DPOTrainer._compute_loss on a LlamaForCausalLM, against ours on the same weights converted."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer = byte_level_bpe(["the sky is blue and the sea is salt"] * 5)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), bos_token_id=1, eos_token_id=2, **TINY_LLAMA
    )
    hf_model = transformers.LlamaForCausalLM(config)
    hf_model.save_pretrained(tmp_path / "hf")
    fast.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").float()
    beta = 0.3
    args = trl.DPOConfig(
        str(tmp_path / "trl"), beta=beta, loss_type=[kind], report_to=[], precompute_ref_log_probs=True,
        use_cpu=True, per_device_train_batch_size=2,
    )  # fmt: skip
    dataset = datasets.Dataset.from_list([{"prompt": "the", "chosen": " sky", "rejected": " sea"}] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=hf_model, args=args, train_dataset=dataset, processing_class=fast)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, tokenizer.get_vocab_size(), (4, 9), generator=generator)  # 2 chosen, 2 rejected
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    completion[1, 7:] = 0  # a shorter answer (its padding at the end)
    completion[2, 8:] = 0
    ref_chosen, ref_rejected = torch.tensor([-30.0, -26.0]), torch.tensor([-29.0, -31.0])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}  # fmt: skip
    trainer.model.train()
    trl_loss = trainer._compute_loss(trainer.model, inputs, False)
    trl_loss.backward()

    targets = ids[:, 1:].masked_fill(completion[:, 1:] == 0, IGNORE_INDEX)
    ours.train()
    values = PreferenceLoss(ours, beta, kind)(ids[:, :-1], targets, torch.cat([ref_chosen, ref_rejected]))
    values[0].backward()
    torch.testing.assert_close(values[0], trl_loss.detach(), rtol=1e-5, atol=1e-6)
    pairs = {
        "model.embed_tokens.weight": ours.tok_embeddings.weight,
        "lm_head.weight": ours.output.weight,
        "model.layers.0.mlp.down_proj.weight": ours.layers[0].feed_forward.w2.weight,
        "model.layers.1.self_attn.v_proj.weight": ours.layers[1].attention.wv.weight,
        "model.layers.1.self_attn.o_proj.weight": ours.layers[1].attention.wo.weight,
        "model.norm.weight": ours.norm.weight,
    }
    hf_parameters = dict(trainer.model.named_parameters())
    for name, parameter in pairs.items():
        torch.testing.assert_close(parameter.grad, hf_parameters[name].grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------
# The pairs
# ---------------------------------------------------------------------------------------------------------


def test_string_pairs_are_the_prompt_after_bos_and_each_answer_before_eos(hf_chat_model):
    tokenizer = Tokenizer(hf_chat_model[0])
    prompt, chosen, rejected = encode_pair(
        tokenizer, {"prompt": "Tell me", "chosen": " Blue.", "rejected": " Red."}
    )
    assert prompt == tokenizer.encode("Tell me", bos=True)
    assert chosen == tokenizer.encode(" Blue.") + [tokenizer.eos_id]
    assert rejected == tokenizer.encode(" Red.") + [tokenizer.eos_id]


def test_a_conversational_pair_is_the_rendered_prompt_and_the_rest_of_each_conversation(hf_chat_model):
    tokenizer = Tokenizer(hf_chat_model[0])
    record = hf_chat_model[1][0]
    prompt, chosen, rejected = encode_pair(tokenizer, record)
    heading = tokenizer.encode(
        render_chat(tokenizer, record["prompt"], add_generation_prompt=True), parse_special=True
    )
    assert prompt == heading
    assert prompt + chosen == encode_chat(tokenizer, record["prompt"] + record["chosen"]).ids
    assert prompt + rejected == encode_chat(tokenizer, record["prompt"] + record["rejected"]).ids
    assert tokenizer.decode(chosen).strip() == record["chosen"][0]["content"]


def test_the_shared_turns_of_chosen_and_rejected_are_the_prompt(hf_chat_model, tmp_path):
    record = hf_chat_model[1][0]
    implicit = {
        "chosen": record["prompt"] + record["chosen"],
        "rejected": record["prompt"] + record["rejected"],
    }
    path = write_jsonl(tmp_path / "p.jsonl", [implicit])
    ((_, read),) = preference_records(path)
    assert read == record


def test_rows_hold_the_chosen_then_the_rejected_with_targets_on_the_answers_only(hf_chat_model, tmp_path):
    tokenizer = Tokenizer(hf_chat_model[0])
    path = write_jsonl(tmp_path / "p.jsonl", hf_chat_model[1][:10])
    train, _ = prepare_preferences(path, tmp_path / "data", tokenizer, 0.2, 1)
    prompt, chosen, rejected = train.pair(0)
    x, y = train.rows(np.array([0, 1]), 32)
    assert x.shape == y.shape == (4, 32)
    for row, answer in ((0, chosen), (2, rejected)):
        ids = np.concatenate([prompt, answer])
        assert x[row, : len(ids) - 1].tolist() == ids[:-1].tolist()
        counted = y[row][y[row] != IGNORE_INDEX]
        assert counted.tolist() == answer.tolist()  # every answer token, and nothing else


def test_pairs_longer_than_the_context_lose_prompt_tokens_and_are_counted(hf_chat_model, tmp_path):
    tokenizer = Tokenizer(hf_chat_model[0])
    path = write_jsonl(tmp_path / "p.jsonl", hf_chat_model[1][:10])
    train, _ = prepare_preferences(path, tmp_path / "data", tokenizer, 0.2, 1)
    prompt, chosen, rejected = train.pair(0)
    seq_len = max(len(chosen), len(rejected)) + 2  # room for 3 prompt tokens
    x, y = train.rows(np.array([0]), seq_len)
    assert x[0, :3].tolist() == prompt[-3:].tolist()  # the prompt's last tokens
    assert y[0][y[0] != IGNORE_INDEX].tolist() == chosen.tolist()
    lines = []
    train.report(seq_len, lines.append)
    assert train.truncation(seq_len)[0] >= 1 and "prompts lose their first tokens" in lines[0]


def test_pairs_are_read_from_parquet_too(hf_chat_model, tmp_path):
    parquet = pytest.importorskip("pyarrow.parquet")
    pyarrow = pytest.importorskip("pyarrow")
    records = hf_chat_model[1][:3] + [{"prompt": "Hi", "chosen": "a", "rejected": "b"}]
    parquet.write_table(pyarrow.Table.from_pylist(records[:3]), tmp_path / "chats.parquet")
    read = [record for _, record in preference_records(str(tmp_path / "chats.parquet"))]
    assert read == records[:3]  # message lists come back as lists of dicts
    path = tmp_path / "strings.parquet"
    parquet.write_table(pyarrow.Table.from_pylist(records[3:] * 2), path)
    assert [where for where, _ in preference_records(str(path))] == [f"{path} row 1", f"{path} row 2"]


def test_pairs_are_read_from_hugging_face_datasets_saved_or_by_name(hf_chat_model, tmp_path):
    """A save_to_disk folder (a DatasetDict: --data-split picks the split), and hf:NAME, here a local folder
    of data files that datasets.load_dataset reads as it would a Hub dataset's."""
    datasets = pytest.importorskip("datasets")
    records = hf_chat_model[1][:5]
    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(records[:3]), "test": datasets.Dataset.from_list(records[3:])
    }).save_to_disk(str(saved))  # fmt: skip
    assert [record for _, record in preference_records(str(saved))] == records[:3]
    read = list(preference_records(str(saved), "test"))
    assert [record for _, record in read] == records[3:] and read[0][0] == f"{saved} row 1"
    with pytest.raises(DataError, match=r"has no split 'dev' \(its splits: train, test\): pass --data-split"):
        list(preference_records(str(saved), "dev"))

    hub = tmp_path / "hub"
    hub.mkdir()
    write_jsonl(hub / "train.jsonl", records)
    spec = f"hf:{hub}"
    assert [record for _, record in preference_records(spec)] == records
    write_jsonl(hub / "train.jsonl", [*records[:2], {"prompt": "Hi"}])
    with pytest.raises(DataError, match=f'{re.escape(spec)} row 3 lacks "chosen" or "rejected"'):
        list(preference_records(spec))


def test_runs_sharing_a_data_dir_keep_their_preference_sets_apart(hf_chat_model, tmp_path):
    """Two preference files prepared into one --data-dir (as runs sharing it do): each run reads its own
    pairs, and preparing the second does not replace the first's."""
    folder, records = hf_chat_model
    first = write_jsonl(tmp_path / "first.jsonl", records[:10])
    second = write_jsonl(tmp_path / "second.jsonl", records[10:30])
    tokenizer = Tokenizer(folder)
    folders = []
    for data in (first, second, first):
        config = dpo_config(folder, data, tmp_path / "run", data_dir=str(tmp_path / "shared"))
        place = shared_preference_folder(shared_data_folder(tmp_path / "shared", tokenizer), config)
        train, val = prepare_preferences(data, place, tokenizer, config.val_fraction, config.split_seed)
        folders.append((place, len(train) + len(val)))
    assert folders[0] == folders[2] and folders[0][0] != folders[1][0]
    assert [count for _, count in folders] == [10, 20, 10]


def run_train(capsys, *argv) -> tuple[int, str]:
    code = train_cli.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "Hi"}, r'line 3 lacks "chosen" or "rejected"'),
        ({"prompt": 5, "chosen": "a", "rejected": "b"}, r'line 3: string answers need a string "prompt"'),
        ({"chosen": [{"role": "robot", "content": "x"}], "rejected": []}, r"line 3: chat message 0 has role"),
    ],
)
def test_a_bad_record_is_one_line_naming_its_file_and_line(hf_chat_model, tmp_path, capsys, bad, message):
    records = hf_chat_model[1][:6]
    records.insert(2, bad)
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    code, err = run_train(
        capsys, "--init-from", hf_chat_model[0], "--data", data, "--dpo", "--out", tmp_path / "run"
    )
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert re.search(f"{re.escape(data)} {message}", last), err


def test_dpo_without_init_from_is_refused():
    with pytest.raises(ConfigError, match="--dpo tunes a trained model against itself: pass --init-from"):
        TrainConfig(dpo=True)


class _Pairs:
    """A stand-in for a PreferenceSplit of 3 pairs: rows of zeros (the scoring below ignores them)."""

    tokens = np.zeros(30)

    def __len__(self):
        return 3

    def rows(self, indices, seq_len):
        rows = torch.zeros((2 * len(indices), seq_len), dtype=torch.long)
        return rows, rows


class _Scores(torch.nn.Module):
    """A loss module giving each row a fixed log-probability, counting its calls."""

    calls = 0

    def forward(self, x, y):
        self.calls += 1
        return torch.arange(len(x), dtype=torch.float32)


class _Processes:
    """The Distributed calls reference_log_probs makes, as the main process of two, the other of which
    finds (or does not find) the recorded log-probabilities."""

    is_main = True

    def __init__(self, other_lacks_them: bool):
        self.other_lacks_them, self.barriers = other_lacks_them, 0

    def any(self, flag, device):
        return flag or self.other_lacks_them

    def barrier(self):
        self.barriers += 1


def test_every_process_reads_or_computes_the_reference_together(tmp_path):
    """Under torchrun a slow process could find OUT/reference/ written by the main process during this very
    call, skip the forward passes and the barrier the others wait at, and hang the run: a process uses the
    recorded values only where every process found them."""
    from llama_mini.train.dpo import reference_log_probs

    def reference(processes, scores):
        return reference_log_probs(
            tmp_path, {"train": _Pairs()}, torch.nn.Linear(1, 1), scores, seq_len=4, batch_size=2,
            source="m", lora=False, resuming=False, dist=processes, device=torch.device("cpu"),
            dtype=torch.float32,
        )  # fmt: skip

    first, scores = _Processes(other_lacks_them=True), _Scores()
    computed = reference(first, scores)["train"]
    assert scores.calls == 2 and first.barriers == 1  # 3 pairs in batches of 2, then written
    assert computed.tolist() == [[0, 2], [1, 3], [0, 1]]  # a batch: its chosen rows, then its rejected
    found_by_all, scores = _Processes(other_lacks_them=False), _Scores()
    assert reference(found_by_all, scores)["train"].tolist() == computed.tolist()
    assert scores.calls == 0 and found_by_all.barriers == 0
    found_here_only, scores = _Processes(other_lacks_them=True), _Scores()
    assert reference(found_here_only, scores)["train"].tolist() == computed.tolist()
    assert scores.calls == 2 and found_here_only.barriers == 1  # computed with the others, and waited


def test_with_adapters_off_a_lora_model_is_its_base():
    model = tiny_model()
    x, _ = pair_rows()
    with torch.no_grad():
        base = model(x)
        apply_lora(model, LoRASettings(rank=4, alpha=8.0, targets=("wq", "wv", "w2")))
        for layer in lora_modules(model).values():
            torch.nn.init.normal_(layer.lora_B.weight)  # as after training: the adapters change the output
        adapted = model(x)
        with adapters_disabled(model):
            reference = model(x)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(reference, base, rtol=0, atol=0)  # the same kernels on the same weights
    assert all(layer.enabled for layer in lora_modules(model).values())


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tuned(hf_chat_model, tmp_path_factory):
    """The tiny model after a few steps of `train.py --chat` on the chosen conversations: its best/."""
    folder, records = hf_chat_model
    root = tmp_path_factory.mktemp("dpo_chat_sft")
    chats = write_jsonl(root / "chats.jsonl", [{"messages": r["prompt"] + r["chosen"]} for r in records])
    code = train_cli.main([
        "--init-from", str(folder), "--data", chats, "--chat", "--out", str(root / "run"), "--device", "cpu",
        "--max-steps", "3", "--batch-size", "4", "--eval-steps", "1", "--sample-tokens", "0", "--max-seq-len", "32",
    ])  # fmt: skip
    assert code == 0
    return root / "run" / "best"


def dpo_config(init_from, data, out, **settings) -> TrainConfig:
    values = dict(init_from=str(init_from), data=str(data), out=str(out), dpo=True, max_steps=6, batch_size=4)
    values |= dict(lr=1e-2, warmup_steps=1, eval_interval=3, eval_steps=2, log_interval=1, sample_tokens=0)
    return TrainConfig(**{**values, "device": "cpu", "dpo_beta": 0.5, **settings})


def records_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_chat_model_dpo_run_starts_at_ln2_resumes_exactly_and_saves_ordinary_checkpoints(
    hf_chat_model, chat_tuned, tmp_path, lora_rank
):
    """From a model chat-tuned with --chat, as a user would go on."""
    folder = chat_tuned
    records = hf_chat_model[1]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    model = {"max_seq_len": 32}
    Trainer(
        dpo_config(folder, data, tmp_path / "whole", lora_rank=lora_rank), model, show_progress=False
    ).run()
    first = records_of(tmp_path / "whole")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["chosen_reward"] == pytest.approx(0, abs=1e-5) and first["reward_margin"] == pytest.approx(
        0, abs=1e-5
    )
    evaluations = [r for r in records_of(tmp_path / "whole") if r["type"] == "eval"]
    assert set(evaluations[0]) >= {"val_loss", "val_reward_accuracy", "val_reward_margin", "val_chosen_reward",
                                   "val_rejected_reward"}  # fmt: skip

    broken = Trainer(
        dpo_config(folder, data, tmp_path / "broken", lora_rank=lora_rank), model, show_progress=False
    )
    original = broken.train_step

    def interrupt_after_step_2(step):
        loss = original(step)
        broken.stop_requested = step == 1
        return loss

    broken.train_step = interrupt_after_step_2
    assert broken.run().step == 2
    resumed = Trainer(dpo_config(folder, data, tmp_path / "broken", lora_rank=lora_rank), {}, resume=True,
                      show_progress=False)  # fmt: skip
    resumed.run()
    train = [[r for r in records_of(tmp_path / run) if r["type"] == "train"] for run in ("whole", "broken")]
    strip = [
        [{k: v for k, v in r.items() if k not in ("time", "tokens_per_second")} for r in rs] for rs in train
    ]
    assert strip[0] == strip[1] and len(strip[0]) == 6

    tuned = load_model(tmp_path / "whole" / "best")  # an ordinary Hugging Face folder
    transformers.LlamaForCausalLM.from_pretrained(tmp_path / "whole" / "best")
    assert tuned.args.vocab_size == load_model(folder).args.vocab_size
    assert (
        Tokenizer(tmp_path / "whole" / "best").chat_template == CHATML_TEMPLATE
    )  # generate --chat as before
    assert (tmp_path / "whole" / "best" / ADAPTER_FOLDER).is_dir() == bool(lora_rank)


@pytest.mark.slow
@pytest.mark.parametrize("parallel, lora", [("fsdp", ["--lora-rank", "4"]), ("ddp", [])])
def test_a_dpo_run_under_two_processes_equals_one_process(hf_chat_model, tmp_path, parallel, lora):
    """Two processes (gloo on CPUs): LoRA under FSDP, the reference computed through the sharded root
    module; full weights under DDP, each process computing the reference of its own pairs. The same
    metrics as one process, step for step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder, records = hf_chat_model
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    flags = ["--init-from", str(folder), "--data", data, "--dpo", *lora, "--device", "cpu", "--dtype", "fp32",
             "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--dpo-beta", "0.5", "--eval-interval", "3",
             "--eval-steps", "2", "--log-interval", "1", "--sample-tokens", "0", "--max-seq-len", "32"]  # fmt: skip
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    repo = Path(__file__).resolve().parent.parent
    for launcher, out in (([], "one"), ([*torchrun], "two")):
        more = ["--parallel", parallel] if launcher else []
        result = subprocess.run(
            [sys.executable, *launcher, "train.py", *flags, *more, "--out", str(tmp_path / out)],
            cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    kept = ("step", "loss", "reward_margin", "val_loss", "val_reward_margin", "val_chosen_reward")
    one, two = (
        [{k: r[k] for k in kept if k in r} for r in records_of(tmp_path / out)] for out in ("one", "two")
    )
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)


@pytest.mark.slow
def test_a_dpo_run_scores_eval_data_beside_its_held_out_pairs(hf_chat_model, chat_tuned, tmp_path, capsys):
    """--eval-data in a --dpo run: each evaluation holds the pairs' val_ metrics and the corpus's bits per
    byte, as a pre-training run's does (how far preference tuning moves the model off plain text)."""
    records = hf_chat_model[1]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    prose = tmp_path / "prose.txt"
    prose.write_text(" ".join(texts_of(records)))
    config = dpo_config(
        chat_tuned, data, tmp_path / "run", max_steps=4, eval_interval=2, eval_data=[str(prose)]
    )
    Trainer(config, {"max_seq_len": 32}, show_progress=False).run()
    evaluations = [record for record in records_of(tmp_path / "run") if record["type"] == "eval"]
    assert [record["step"] for record in evaluations] == [2, 4]
    for record in evaluations:
        assert 0 <= record["val_reward_accuracy"] <= 1 and 0 < record["val_bpb/prose"] < 16
    assert evaluations[0]["val_bpb/prose"] != evaluations[1]["val_bpb/prose"]  # the model moved
