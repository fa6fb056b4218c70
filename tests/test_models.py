"""The separated backbone + chunked LM head must reproduce each architecture's own forward and gradients."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.capture import capture_topk
from pipeline.capture_spec import CaptureSpec
from pipeline.losses import distillation_parts, next_token_labels
from pipeline.models import LMHead
from pipeline.student import train_step_loss
from pipeline.teacher import capture_batch

VOCAB = 300
SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32}
ARCHITECTURES = {
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64},
    "opt": {**SMALL, "ffn_dim": 64, "max_position_embeddings": 64, "word_embed_proj_dim": 32},
    "gpt_neox": {**SMALL, "intermediate_size": 64, "max_position_embeddings": 64},
    "qwen2": {**SMALL, "num_key_value_heads": 1, "intermediate_size": 64},
    "gemma2": {
        **SMALL,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
        "head_dim": 16,
        "final_logit_softcapping": 5.0,
    },
    "gemma3_text": {**SMALL, "num_key_value_heads": 1, "intermediate_size": 64, "head_dim": 16},
    "phi3": {**SMALL, "num_key_value_heads": 1, "intermediate_size": 64, "pad_token_id": 0},
    "cohere": {**SMALL, "num_key_value_heads": 1, "intermediate_size": 64, "logit_scale": 0.5},
    "granite": {**SMALL, "num_key_value_heads": 1, "intermediate_size": 64, "logits_scaling": 4.0},
    "mixtral": {**SMALL, "num_key_value_heads": 1, "intermediate_size": 64, "num_local_experts": 2},
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 2},
    "llama4_text": {
        **SMALL,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
        "intermediate_size_mlp": 64,
        "head_dim": 16,
    },
}


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **ARCHITECTURES[model_type])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_chunked_capture_equals_capture_of_the_full_logits(model_type):
    model = tiny(model_type).eval()
    head = LMHead(model)
    ids = torch.randint(0, VOCAB, (2, 12))
    head.check_parity(ids[:1])
    spec = CaptureSpec(strategy="topk", k=8)
    rows, _ = capture_batch(head, ids, spec, first_seq=0, chunk_positions=5)
    with torch.no_grad():
        reference = capture_topk(model(ids).logits.reshape(-1, VOCAB), 8)
    topk_logprobs = torch.from_numpy(np.concatenate([row.logprobs for row in rows]))
    tail = torch.from_numpy(np.concatenate([row.tail_logmass for row in rows]))
    torch.testing.assert_close(topk_logprobs.reshape(-1, 8), reference[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail.reshape(-1), reference[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        CaptureSpec(strategy="topp", k=None, top_p=0.9, min_k=2, max_k=16),
        CaptureSpec(strategy="sample", k=None, samples=16, sample_temperature=1.0, sample_logprobs=True, seed=3),
        CaptureSpec(strategy="hybrid", k=4, samples=8, sample_temperature=1.0, seed=3),
    ],
    ids=lambda spec: spec.strategy,
)
def test_chunked_capture_keys_draws_by_global_position(spec):
    """Chunking and batch offsets must not change what is captured at a position."""
    model = tiny("qwen2").eval()
    head = LMHead(model)
    ids = torch.randint(0, VOCAB, (3, 12))
    whole, _ = capture_batch(head, ids, spec, first_seq=5, chunk_positions=36)
    chunked, _ = capture_batch(head, ids, spec, first_seq=5, chunk_positions=7)
    alone, _ = capture_batch(head, ids[2:], spec, first_seq=7, chunk_positions=5)
    for left, right in [(whole, chunked), (whole[2:], alone)]:
        for a, b in zip(left, right, strict=True):
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
            if a.counts is not None:
                np.testing.assert_array_equal(a.counts, b.counts)


@pytest.mark.parametrize("model_type", ["gemma2", "gpt2", "cohere"])
def test_chunked_training_step_gives_the_gradient_of_the_full_loss(model_type):
    teacher = tiny("qwen2").eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        topk_ids, topk_logprobs, tail = capture_topk(teacher(ids).logits.reshape(-1, VOCAB), 8)
    batch = {
        "input_ids": ids,
        "ids": topk_ids.reshape(2, 12, 8),
        "logprobs": topk_logprobs.reshape(2, 12, 8),
        "tail_logmass": tail.reshape(2, 12),
    }
    chunked, full = tiny(model_type).eval(), tiny(model_type).eval()  # eval: no dropout, same randomness
    full.load_state_dict(chunked.state_dict())
    train_step_loss(LMHead(chunked), batch, alpha=0.3, temperature=2.0, chunk_positions=7, scale=1.0, autocast=None)
    parts = distillation_parts(
        full(ids).logits.reshape(-1, VOCAB), next_token_labels(ids).reshape(-1), topk_ids, topk_logprobs, tail, 2.0
    )
    (0.3 * parts.kd_sum / parts.kd_count + 0.7 * parts.ce_sum / parts.ce_count).backward()
    for (name, a), (_, b) in zip(chunked.named_parameters(), full.named_parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
