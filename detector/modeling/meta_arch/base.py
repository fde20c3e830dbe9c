"""What every meta-architecture shares: input normalisation and padding into one batch, and the
checks of the ground truth it trains on."""
from typing import List, Sequence

import torch
from torch import nn

from detector.structures import ImageList, Instances

__all__ = ["DetectorBase"]


class DetectorBase(nn.Module):
    """Base of the meta-architectures. Subclasses call :meth:`_set_input_format` and set
    ``num_classes`` and ``num_classes_key`` (the config key named in errors)."""

    num_classes: int
    num_classes_key = "NUM_CLASSES"

    def _set_input_format(self, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                          size_divisibility: int) -> None:
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"MODEL.PIXEL_MEAN {list(pixel_mean)} and MODEL.PIXEL_STD "
                             f"{list(pixel_std)} need the same length")
        self.size_divisibility = size_divisibility
        # buffers so they follow .to(device); not persistent, like torchvision's transform
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1).float(),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1).float(),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @staticmethod
    def stage(name: str):
        """A ``torch.profiler`` label ``detector::<name>`` for one step of the forward
        (preprocess, network, anchors, matching, loss, postprocess), so a profile of any run
        splits its time by step (``tools/benchmark.py --breakdown``); free when not profiling."""
        return torch.profiler.record_function(f"detector::{name}")

    def postprocessing_precision(self):
        """A context running its code in float32 even inside an autocast region (decoding, NMS
        and mask pasting need the precision; only the network runs in the autocast dtype)."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """Move to the device, normalise, pad into one batch whose sides are multiples of
        ``size_divisibility``."""
        images = []
        for i, x in enumerate(batched_inputs):
            image = x["image"]
            if image.dim() != 3 or image.shape[0] != self.pixel_mean.shape[0]:
                channels = self.pixel_mean.shape[0]
                raise ValueError(f"Image {x.get('image_id', i)}: expected a ({channels}, H, W) "
                                 f"tensor, got shape {tuple(image.shape)}")
            image = image.to(self.device, non_blocking=True).float()
            images.append((image - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images, self.size_divisibility)

    def _gt_instances(self, batched_inputs: List[dict]) -> List[Instances]:
        """The ``instances`` of every input on the model's device; one-line errors for missing
        ground truth, classes out of range and degenerate or non-finite boxes."""
        gt_instances = []
        for i, x in enumerate(batched_inputs):
            image_id = x.get("image_id", i)
            if "instances" not in x:
                raise ValueError(f"Image {image_id}: training needs an 'instances' field with "
                                 "gt_boxes and gt_classes")
            inst = x["instances"].to(self.device)
            boxes, classes = inst.gt_boxes.tensor, inst.gt_classes
            if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
                raise ValueError(f"Image {image_id}: gt_classes {sorted(set(classes.tolist()))} "
                                 f"outside [0, {self.num_classes}) ({self.num_classes_key})")
            bad = ~(torch.isfinite(boxes).all(dim=1) & (boxes[:, 2] > boxes[:, 0])
                    & (boxes[:, 3] > boxes[:, 1]))
            if bad.any():
                raise ValueError(f"Image {image_id}: degenerate or non-finite gt box "
                                 f"{boxes[bad][0].tolist()} (need x2 > x1 and y2 > y1)")
            gt_instances.append(inst)
        return gt_instances
