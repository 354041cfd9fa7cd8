"""PEFT's adapter format (llama_mini/checkpoint/peft.py): PEFT reads what we write and we read what PEFT writes,
with the same logits both ways, PEFT's key names, and unsupported adapters refused in one line."""

import json

import pytest
import torch
from safetensors import safe_open

from llama_mini.checkpoint import load_model, save_pretrained
from llama_mini.checkpoint.peft import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    PEFT_MODULE_NAMES,
    load_adapter,
    read_adapter,
    save_adapter,
)
from llama_mini.errors import CheckpointError
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer
from llama_mini.ops.lora import LoRASettings, apply_lora, lora_modules

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# Grouped-query attention (4 query heads, 2 kv heads): lora_B of q_proj and k_proj are permuted with
# different head counts, so a mix-up of the two would show.
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=32, vocab_size=64)


def trained_looking_adapters(model: Transformer, settings: LoRASettings) -> Transformer:
    """Adapters with B not zero (and no symmetry), as after training, so that they change the logits."""
    apply_lora(model, settings)
    generator = torch.Generator().manual_seed(1)
    for module in lora_modules(model).values():
        module.lora_B.weight.data = torch.randn(module.lora_B.weight.shape, generator=generator) * 0.1
    return model.eval()


@pytest.fixture
def base_folder(tmp_path):
    torch.manual_seed(0)
    save_pretrained(Transformer(ARGS), tmp_path / "base")
    return tmp_path / "base"


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def test_peft_reads_our_adapter_and_gives_our_logits(base_folder, tmp_path):
    ours = trained_looking_adapters(load_model(base_folder), LoRASettings(4, 8.0, 0.0, ALL_TARGETS))
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base_folder))
    hf_base = transformers.LlamaForCausalLM.from_pretrained(base_folder)
    theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        # float32 throughout; transformers sums in another order: a few float32 ulps of the logits
        torch.testing.assert_close(theirs(tokens()).logits, ours(tokens()), rtol=1e-5, atol=1e-5)


def test_we_read_a_peft_adapter_and_give_its_logits(base_folder, tmp_path):
    torch.manual_seed(2)
    config = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    )
    theirs = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_folder), config)
    for name, parameter in theirs.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_model(base_folder)
    settings = load_adapter(ours, tmp_path / "adapter")
    assert settings == LoRASettings(4, 12.0, 0.0, ("wq", "wk", "wv", "wo", "w1", "w3"))
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(tokens()), theirs.eval()(tokens()).logits, rtol=1e-5, atol=1e-5
        )


def test_our_adapter_has_pefts_key_names_and_shapes(base_folder, tmp_path):
    model = trained_looking_adapters(load_model(base_folder), LoRASettings(4, 8.0, 0.0, ALL_TARGETS))
    save_adapter(model, tmp_path / "ours")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(PEFT_MODULE_NAMES.values()))
    peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_folder), config).save_pretrained(
        tmp_path / "theirs"
    )

    def shapes(folder):
        with safe_open(str(folder / ADAPTER_WEIGHTS_FILE), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}

    assert shapes(tmp_path / "ours") == shapes(tmp_path / "theirs")
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in shapes(tmp_path / "ours")


def test_adapter_round_trip_is_bit_exact(base_folder, tmp_path):
    model = trained_looking_adapters(load_model(base_folder), LoRASettings(2, 3.0, 0.05, ALL_TARGETS))
    save_adapter(model, tmp_path / "adapter")
    stored = read_adapter(tmp_path / "adapter", ARGS)
    assert stored.settings == LoRASettings(2, 3.0, 0.05, ALL_TARGETS)
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            assert torch.equal(stored.tensors[name], tensor), name  # the RoPE permutation undone exactly


@pytest.mark.parametrize(
    "change, named",
    [({"use_dora": True}, "use_dora"), ({"use_rslora": True}, "use_rslora"), ({"bias": "all"}, "bias"),
     ({"peft_type": "IA3"}, "peft_type"), ({"target_modules": ["embed_tokens"]}, "target_modules")],
)  # fmt: skip
def test_adapters_we_cannot_compute_are_refused_in_one_line(change, named, base_folder, tmp_path):
    model = trained_looking_adapters(load_model(base_folder), LoRASettings(2, 4.0))
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    (tmp_path / "adapter" / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=named) as error:
        read_adapter(tmp_path / "adapter", ARGS)
    assert "\n" not in str(error.value)


def test_an_adapter_of_another_model_is_refused(base_folder, tmp_path):
    model = trained_looking_adapters(load_model(base_folder), LoRASettings(2, 4.0))
    save_adapter(model, tmp_path / "adapter")
    wider = ModelArgs(**{**ARGS.to_dict(), "dim": 64})
    with pytest.raises(CheckpointError, match="has shape .* an adapter of another model"):
        read_adapter(tmp_path / "adapter", wider)
