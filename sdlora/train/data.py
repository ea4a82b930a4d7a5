"""The training data of one run: the dataset, its class images, and which batch comes when.

Batches are addressed by a global micro-batch number g (step * accumulation + micro, spread over
processes), so the data of any step is known without replaying the ones before it: that is what
makes `--resume` exact and lets several processes take disjoint batches.
"""

from __future__ import annotations

from sdlora.train.class_images import ensure_class_images
from sdlora.train.config import Config
from sdlora.train.dataset import TrainingDataset


class TrainingData:
    def __init__(self, config: Config, pipeline, resolution: int, prepare: bool):
        """`prepare`: this process generates missing class images (the main process does)."""
        data = config.data
        if data.class_dir and prepare:
            ensure_class_images(pipeline, data.class_dir, data.class_prompt, data.num_class_images,
                                batch_size=config.train.batch_size, seed=config.train.seed,
                                resolution=resolution)
        self.dataset = TrainingDataset(
            data.instance_dir, data.instance_prompt, resolution=resolution, bucket=data.bucket,
            random_crop=data.random_crop, random_flip=data.random_flip,
            caption_dropout=data.caption_dropout, shuffle_tags=data.shuffle_tags,
            keep_tokens=data.keep_tokens, trigger_word=data.trigger_word,
            class_dir=data.class_dir, class_prompt=data.class_prompt, before_dir=data.before_dir,
            seed=config.train.seed,
        )
        kinds = ["instance", "class"] if data.class_dir else ["instance"]
        self.samplers = {kind: self.dataset.batch_sampler(config.train.batch_size, kind)
                         for kind in kinds}
        self._epochs: dict[tuple[str, int], list[list[int]]] = {}

    @property
    def kinds(self) -> list[str]:
        return list(self.samplers)

    def batch(self, kind: str, global_index: int) -> tuple[int, list[int]]:
        """(epoch, dataset indices) of micro-batch number `global_index` of `kind`."""
        per_epoch = len(self._batches(kind, 0))
        epoch, position = divmod(global_index, per_epoch)
        return epoch, self._batches(kind, epoch)[position]

    def _batches(self, kind: str, epoch: int) -> list[list[int]]:
        key = (kind, epoch)
        if key not in self._epochs:
            self._epochs = {k: v for k, v in self._epochs.items() if k[1] >= epoch - 1}
            self._epochs[key] = self.samplers[kind].batches_for_epoch(epoch)
        return self._epochs[key]

    @property
    def num_instance_images(self) -> int:
        return sum(not sample.is_class for sample in self.dataset.samples)

    def tag_frequency(self) -> dict:
        return self.dataset.tag_frequency()

    def describe(self) -> str:
        return self.dataset.describe()
