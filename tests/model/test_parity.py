"""Loading the original's tiny checkpoint reproduces its logits, hidden states and losses (golden/backbone)."""

import pytest
import torch
from safetensors.torch import load_file

from moss.model import MossTTSD
from tests.conftest import requires_golden

pytestmark = requires_golden


@pytest.fixture(scope="module")
def forward(golden):
    def run(attn):
        model = MossTTSD.from_pretrained(golden / "backbone" / "model", attn_implementation=attn).eval()
        inp = load_file(golden / "backbone" / "forward_inputs.safetensors")
        with torch.no_grad():
            out = model(
                inp["input_ids"],
                attention_mask=inp["attention_mask"],
                labels=inp["labels"],
                output_logits=True,
                output_hidden_states=True,
            )
        return model, inp, out

    return run


@pytest.fixture(scope="module")
def expected(golden):
    return load_file(golden / "backbone" / "forward_outputs.safetensors")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hidden_states_and_logits_match_original(forward, expected, attn):
    _, inp, out = forward(attn)
    valid = inp["attention_mask"].bool()
    for i in range(3):
        torch.testing.assert_close(
            out.hidden_states[i][valid], expected[f"hidden_states_{i}"][valid], atol=1e-5, rtol=0
        )
    for c, logits in enumerate(out.logits):

        def exp(key, c=c):
            return expected[f"ch{c}_{key}"]

        torch.testing.assert_close(logits[..., :16][valid], exp("logits_first16")[valid], atol=1e-4, rtol=0)
        torch.testing.assert_close(logits[..., -16:][valid], exp("logits_last16")[valid], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.logsumexp(logits, -1)[valid], exp("logsumexp")[valid], atol=1e-4, rtol=0)
        torch.testing.assert_close(logits.amax(-1)[valid], exp("max")[valid], atol=1e-4, rtol=0)
        assert torch.equal(logits.argmax(-1)[valid], exp("argmax")[valid])
        rows = torch.stack([logits[0, 24], logits[1, 5]])
        torch.testing.assert_close(rows, exp("logits_at_positions"), atol=1e-4, rtol=0)
        nxt = exp("next_label")
        picked = logits.gather(-1, nxt.clamp(min=0)[..., None]).squeeze(-1) * (nxt != -100)
        torch.testing.assert_close(picked[valid], exp("logit_of_next_label")[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_losses_match_original(forward, expected, attn):
    model, inp, out = forward(attn)
    torch.testing.assert_close(out.channel_losses, expected["loss_all"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss.reshape(1), expected["loss"], atol=1e-5, rtol=0)
    model.set_channel_weights([8, 2, 1, 1, 1, 1, 1, 1])
    with torch.no_grad():
        tuned = model(inp["input_ids"], attention_mask=inp["attention_mask"], labels=inp["labels"])
    model.set_channel_weights([1] * 8)
    torch.testing.assert_close(tuned.loss.reshape(1), expected["loss_finetune_weights"], atol=1e-5, rtol=0)
    assert tuned.logits is None  # logits are not materialised when only the loss is asked for


def test_summed_losses_give_the_original_train_mode_objective(forward, expected):
    """Our per-channel sums divided by the all-channel count reproduce the original Trainer objective."""
    _, _, out = forward("eager")
    n_all = int(expected["trainmode_equiv_num_items_in_batch"])
    assert int(out.channel_label_counts.sum()) == n_all
    torch.testing.assert_close(out.channel_loss_sums / n_all, expected["trainmode_equiv_loss_all"], atol=1e-5, rtol=0)
