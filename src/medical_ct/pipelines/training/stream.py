"""Training batches streamed from the decoded shards, for model input beyond memory.

Here, not in ``medical_ct.shards``: that module is storage, imported by data_processing, which
has no use for torch (3 s of every such process's start-up).
"""

import math
from collections.abc import Iterator

import numpy as np
import torch

from medical_ct.preprocessing import IMAGE_SIZE
from medical_ct.shards import ModelInputSet


class ShardStream(torch.utils.data.IterableDataset):
    """Training batches streamed shard by shard, shuffled across shards, for data beyond memory.

    Each pass visits the shards in a random order, ``shards_in_memory`` at a time; the images
    of those shards are shuffled together (and with what is left of the previous group) into
    batches of ``batch_size``: memory holds ``shards_in_memory`` shards (4 KiB per image),
    not the whole set. Every pass yields ``ceil(n / batch_size)`` batches, like the in-memory
    path, so the learning-rate schedule is the same.
    """

    def __init__(
        self,
        model_input: ModelInputSet,
        batch_size: int,
        shards_in_memory: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.model_input = model_input
        self.batch_size = batch_size
        self.shards_in_memory = shards_in_memory
        self.generator = generator
        self.groups = model_input.shard_groups()
        self.labels = torch.from_numpy(model_input["labels"])

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "ShardStream yields whole batches in the process that trains: in DataLoader "
                "workers each would yield every image (and the same order every epoch, from "
                "a copy of the generator). Iterate it directly, or with num_workers=0"
            )
        order = torch.randperm(len(self.groups), generator=self.generator).tolist()
        images = torch.empty((0, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
        labels = torch.empty(0, dtype=torch.int64)
        for start in range(0, len(order), self.shards_in_memory):
            chosen = [self.groups[i] for i in order[start : start + self.shards_in_memory]]
            positions = np.concatenate(chosen)
            images = torch.cat([images, torch.from_numpy(self.model_input.gather(positions))])
            labels = torch.cat([labels, self.labels[positions]])
            shuffle = torch.randperm(len(labels), generator=self.generator)
            images, labels = images[shuffle], labels[shuffle]
            last = start + self.shards_in_memory >= len(order)
            full = len(labels) if last else len(labels) - len(labels) % self.batch_size
            for batch in range(0, full, self.batch_size):
                end = batch + self.batch_size
                yield images[batch:end], labels[batch:end]
            images, labels = images[full:], labels[full:]
