"""Tiny random Hugging Face models of every architecture fusedadapter.patch supports (tests only)."""

from __future__ import annotations

import types

import pytest
import torch
import transformers

ARCHS = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "vit", "gpt2", "llama", "mistral", "qwen2"]
RMS_NORM_ARCHS = {"llama", "mistral", "qwen2"}

HIDDEN = 32
LAYERS = 2


def tiny_config(arch: str, *, dropout: bool = True):
    """A 2-block, hidden-32 config. ``dropout=False`` zeroes every dropout the model has (the
    fusion's dropout included: AdapterHub takes it from ``attention_probs_dropout_prob``)."""
    kw = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64)
    p = 0.1 if dropout else 0.0
    if arch in ("bert", "roberta", "xlm-roberta", "electra"):
        cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
               "xlm-roberta": transformers.XLMRobertaConfig, "electra": transformers.ElectraConfig}[arch]
        extra = {"embedding_size": 16} if arch == "electra" else {}
        return cls(vocab_size=97, hidden_dropout_prob=p, attention_probs_dropout_prob=p, max_position_embeddings=40,
                   **extra, **kw)
    if arch == "distilbert":
        return transformers.DistilBertConfig(vocab_size=97, dim=HIDDEN, n_layers=LAYERS, n_heads=4, hidden_dim=64,
                                             dropout=p, attention_dropout=p, max_position_embeddings=40)
    if arch == "vit":
        return transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_dropout_prob=p,
                                      attention_probs_dropout_prob=p, **kw)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=97, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=40,
                                       resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, bos_token_id=0, eos_token_id=0)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch]
    return cls(vocab_size=97, num_key_value_heads=2, max_position_embeddings=40, attention_dropout=p, **kw)


def tiny_model(arch: str, *, seed: int = 0, dropout: bool = True, head: bool = False):
    """A random tiny model in eval mode (a base model, or with a sequence-classification head)."""
    torch.manual_seed(seed)
    config = tiny_config(arch, dropout=dropout)
    if head:
        if arch == "vit":
            model = transformers.ViTForImageClassification(config)
        else:
            config.num_labels = 3
            config.pad_token_id = 0
            model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        model = transformers.AutoModel.from_config(config)
    return true_float64_rmsnorm(model).eval()


def _rmsnorm_forward(self, hidden_states):
    # transformers' Llama/Mistral/Qwen2 RMSNorm, except that float64 stays float64 (the original
    # rounds every float64 activation to float32, which makes a float64 model no truth for the
    # docs/algorithm.md §4 oracle). For float32 and half inputs this is op for op the original.
    input_dtype = hidden_states.dtype
    if input_dtype != torch.float64:
        hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def true_float64_rmsnorm(model):
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_rmsnorm_forward, m)
    return model


def tiny_inputs(arch: str, *, batch: int = 2, seq: int = 6, seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype)}
    ids = torch.randint(1, 97, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -1] = 0  # one padded token
    return {"input_ids": ids, "attention_mask": mask}


def embeds_inputs(model, arch: str, inputs: dict) -> dict:
    """The same batch with the input embeddings (or pixels) as a leaf that requires grad."""
    if arch == "vit":
        return {"pixel_values": inputs["pixel_values"].detach().clone().requires_grad_(True)}
    emb = model.get_input_embeddings()(inputs["input_ids"]).detach().clone().requires_grad_(True)
    return {"inputs_embeds": emb, "attention_mask": inputs["attention_mask"]}


def last_hidden(output) -> torch.Tensor:
    if hasattr(output, "last_hidden_state") and output.last_hidden_state is not None:
        return output.last_hidden_state
    return output[0]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one intra-op thread: for tiny models a second thread
    only adds synchronisation, and stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
