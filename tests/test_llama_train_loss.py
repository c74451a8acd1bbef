"""The chunked causal-LM loss (seed.training.llm.loss) equals HF's plain loss and never holds the whole
logits: tiny random LLaMA, fp32 on the CPU, LoRA (lm_head a peft ModulesToSaveWrapper) and full
fine-tuning, through the trainer's own micro_step."""

from __future__ import annotations

import pytest
import torch

from seed.training.llm import model as M
from seed.training.llm.loss import ChunkedLossLM, chunked_causal_lm_loss, loss_model
from seed.training.llm.train import micro_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)

VOCAB = 700
CPU = torch.device("cpu")


def make(lora: bool, dtype: str = "float32") -> torch.nn.Module:
    torch.manual_seed(0)
    base = M.tiny_base(600).to(M.DTYPES[dtype])
    model = M.build_model(base, VOCAB, lora=M.LoraSettings(dropout=0.0) if lora else None, dtype=dtype)
    return model.train()


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 24), generator=g)
    labels = ids.clone()
    labels[0, 17:] = -100  # right padding
    labels[1, :9] = -100  # a prompt that is not learned
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in M.trainable_named_parameters(model)}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(lora):
    model, b = make(lora), batch()
    plain, n = micro_step(model, b, world=1, scale=1.0, device=CPU)
    g_plain = grads(model)
    net = loss_model(model, 10)  # 10 tokens a time: 6 chunks, the last one short (54 learned tokens: 16 + 15 + 23)
    assert isinstance(net, ChunkedLossLM) and n == 54
    assert [k for k, _ in net.named_parameters()] == [k for k, _ in model.named_parameters()]
    chunked, n2 = micro_step(net, b, world=1, scale=1.0, device=CPU)
    g_chunked = grads(model)
    assert n2 == n and abs(chunked - plain) <= 1e-6 * abs(plain), (chunked, plain)
    assert g_chunked.keys() == g_plain.keys()
    for k, g in g_plain.items():
        assert (g_chunked[k] - g).norm() <= 1e-5 * g.norm() + 1e-12, k
    # the loss of HF's own forward, the way the original calls it (token mean, no num_items)
    ref = model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss.item()
    assert abs(net(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss.item() - ref) <= 1e-6 * ref


def test_logits_are_never_whole():
    """Every lm_head call (forward and its recomputation in backward) sees at most a chunk of the
    learned positions; HF's loss calls it once on all B x T positions."""
    model, b = make(True), batch()
    rows: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[:-1].numel()))
    micro_step(loss_model(model, 16), b, world=1, scale=1.0, device=CPU)
    assert rows and max(rows) <= 16 and sum(rows) == 2 * 54  # forward + recomputation, learned tokens only
    rows.clear()
    micro_step(loss_model(model, None), b, world=1, scale=1.0, device=CPU)
    assert rows == [3 * 24]


def test_no_learned_token_gives_zero_gradients_on_every_parameter():
    """A micro-batch (or a DDP rank's share) without a learned token: loss 0 and a zero gradient on
    every trainable parameter (DDP needs each one in the graph), as HF's loss."""
    model, b = make(True), batch()
    b["labels"][:] = -100
    loss, n = micro_step(loss_model(model, 8), b, world=1, scale=1.0, device=CPU)
    assert (loss, n) == (0.0, 0)
    g = grads(model)
    assert all(v.abs().max() == 0 for v in g.values()) and len(g) == len(M.trainable_named_parameters(model))


def test_bf16_base_under_autocast():
    """A bf16 frozen base on the CPU runs under bf16 autocast (the trainer's CPU path): chunks upcast
    their logits to fp32 as HF does; loss and gradients agree with the plain loss to bf16 precision."""
    model, b = make(True, "bfloat16"), batch()
    plain, _ = micro_step(model, b, world=1, scale=1.0, device=CPU, amp=torch.bfloat16)
    g_plain = grads(model)
    chunked, _ = micro_step(loss_model(model, 10), b, world=1, scale=1.0, device=CPU, amp=torch.bfloat16)
    g_chunked = grads(model)
    assert abs(chunked - plain) <= 1e-3 * abs(plain)
    for k, g in g_plain.items():
        assert (g_chunked[k] - g).norm() <= 2e-2 * g.norm() + 1e-8, k


def test_bad_chunk_and_models_with_own_parameters():
    with pytest.raises(ValueError, match="chunk"):
        ChunkedLossLM(make(False), 0)
    odd = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="parameters or buffers of its own"):
        ChunkedLossLM(odd, 4)
    with pytest.raises(ValueError, match="chunk"):
        chunked_causal_lm_loss(torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), odd, 0)
