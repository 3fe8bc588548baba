"""Distributed equivalence: one step of a 2-process gloo DDP run on CPU gives the same gradients
as one process on the same global batch (within float tolerance: DDP averages the two halves'
gradients, a different summation order than one process).

The model is an SPP detection head on a small conv trunk: conv -> spp_triton FPN pooler (two maps,
boxes assigned by detectron2's rule) -> FC -> loss, so the pooling ops' backward runs under DDP.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import spp_triton

BATCH, CHANNELS, SIZE = 4, 8, 32


class TinySPPDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Conv2d(3, CHANNELS, 3, stride=2, padding=1)
        self.down = nn.Conv2d(CHANNELS, CHANNELS, 3, stride=2, padding=1)
        self.fc = nn.Linear(CHANNELS * 21, 5)

    def forward(self, images, rois, feature_index):
        p2 = torch.relu(self.trunk(images))
        p3 = torch.relu(self.down(p2))
        # rois' batch indices are local to this process's images
        pooled = spp_triton.multilevel_roi_spp_pool(
            [p2, p3], rois, feature_index, [0.5, 0.25], (1, 2, 4)
        )
        return self.fc(pooled)


def global_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    per_image = 6
    xy = torch.rand(BATCH * per_image, 4, generator=g) * SIZE
    boxes = torch.stack(
        [
            xy[:, [0, 2]].min(1).values,
            xy[:, [1, 3]].min(1).values,
            xy[:, [0, 2]].max(1).values + 1,
            xy[:, [1, 3]].max(1).values + 1,
        ],
        1,
    )
    image_of_box = torch.arange(BATCH).repeat_interleave(per_image)
    feature_index = torch.randint(0, 2, (BATCH * per_image,), generator=g)
    labels = torch.randint(0, 5, (BATCH * per_image,), generator=g)
    return images, boxes, image_of_box, feature_index, labels


def step_gradients(model, images, boxes, image_of_box, feature_index, labels, first_image):
    rois = torch.cat([(image_of_box - first_image).float()[:, None], boxes], 1)
    logits = model(images, rois, feature_index)
    loss = nn.functional.cross_entropy(logits, labels)  # mean over this process's boxes
    loss.backward()


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = nn.parallel.DistributedDataParallel(TinySPPDetector())
        images, boxes, image_of_box, feature_index, labels = global_batch()
        per_rank = BATCH // world
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        sel = (image_of_box >= lo) & (image_of_box < hi)
        step_gradients(
            model, images[lo:hi], boxes[sel], image_of_box[sel], feature_index[sel], labels[sel], lo
        )
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_step_equals_single_process(tmp_path):
    out = str(tmp_path / "ddp_grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out)

    model = TinySPPDetector()
    images, boxes, image_of_box, feature_index, labels = global_batch()
    step_gradients(model, images, boxes, image_of_box, feature_index, labels, 0)
    single = {n: p.grad for n, p in model.named_parameters()}
    assert single.keys() == ddp.keys()
    for name in single:
        assert single[name].abs().sum() > 0, name
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
