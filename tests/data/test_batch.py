"""The typed batch crosses to a GPU as the dict did: pinned by the loader, host fields left on the host."""

import numpy as np
import torch
from torch.utils.data._utils.pin_memory import pin_memory

from moss.data.examples import Example
from moss.data.packing import collate_packs


def pack():
    rows = [Example(f"s{n}", n, np.zeros((n, 8), np.int64), np.zeros((n, 8), np.int64)) for n in (5, 3)]
    return collate_packs([rows], 12, text_pad_id=0)


def test_the_loaders_pinning_reaches_the_device_fields_and_keeps_the_host_ones(monkeypatch):
    pinned = []

    def fake_pin(tensor, *args, **kwargs):  # page-locking needs a CUDA device; record what would be pinned
        pinned.append(tensor.data_ptr())
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = pack()
    out = pin_memory(batch)  # what torch's loader calls with pin_memory=True
    assert type(out) is type(batch) and out.stats == batch.stats
    assert sorted(pinned) == sorted(t.data_ptr() for t in (batch.input_ids, batch.labels, batch.position_ids))
    assert out.cu_seqlens is batch.cu_seqlens and out.label_counts is batch.label_counts  # read on the host
    assert torch.equal(out.input_ids, batch.input_ids) and out.input_ids is not batch.input_ids


def test_moving_keeps_the_host_fields_on_the_host():
    batch = pack()
    moved = batch.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.position_ids.device.type == "meta"
    assert moved.cu_seqlens is batch.cu_seqlens and moved.label_counts is batch.label_counts
    assert set(moved.model_inputs()) == {
        "input_ids",
        "labels",
        "position_ids",
        "cu_seqlens",
        "max_seqlen",
        "label_counts",
    }
