"""CUDA numerics (skipped without a GPU): why README says fp32 master weights + bf16 autocast + the padding roll.
On an H100, CUDA SDPA under bf16 autocast gave NaN gradients from left-pad rows with no key to attend to (the SFT
loss was NaN by step 4); policy.token_logprobs rolls left padding to the right before the forward."""
import pytest
import torch

import policy
import sft_mask
import testbed
from config import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config("configs/tiny.yaml", [f"--data.dir={tmp_path_factory.mktemp('data')}"])
    task = testbed.load_task(cfg)
    torch.manual_seed(0)
    model, tok = policy.load_policy(None, task.vocabulary(), dtype="auto", device="cuda",
                                    tiny_kwargs=policy.tiny_kwargs(cfg.model))
    return cfg, task, model, tok


def test_sft_steps_under_bf16_autocast_have_finite_loss_and_gradients(setup):
    cfg, task, model, tok = setup
    items = sft_mask.encode_sft_examples(task.splits["sft"], tok, task.schema, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):  # batches of different prompt lengths: left padding in every batch
        idx = torch.randint(len(items), (32,), generator=gen).tolist()
        ids, attn, tgt, comp, keep = [t.cuda() for t in sft_mask.sft_batch([items[i] for i in idx], tok, cfg.mask, gen)]
        with policy.autocast("auto", "cuda"):
            loss = sft_mask.completion_loss(model, ids, attn, tgt, comp, keep)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()


def test_cached_sampling_equals_the_reference_on_cuda(setup):
    _, task, model, tok = setup
    prompts = [policy.encode(tok, f"<query> {ex.query} </query> <product> {ex.product} </product>", True)
               for ex in task.splits["test_id"][:3]]
    args = (prompts, 2, 12, 1.0, tok.eos_token_id, tok.pad_token_id, 7)
    assert policy.sample(model, *args) == policy.sample_reference(model, *args)
