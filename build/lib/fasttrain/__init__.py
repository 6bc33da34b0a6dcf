"""fasttrain: the teaching library of the course "Training image classifiers fast".

Each module holds one idea. `runtime` starts and finishes a chapter's run (`fasttrain.start`);
`device` says where and in what precision to compute; `datasets` loads CIFAR-10 and the digits;
`batches` cuts and augments batches on the device; `step` is the one training step every loop
uses; `train` is the Learner and its callbacks; `board` draws live curves; `results` holds the
targets table and the records. Later chapters add `costs`, `vgg`, `resnet`, `lr_finder`,
`schedules`, `sharpness`, `recipes`, `local_complexity` and `regions`.
"""

__version__ = "0.2.0"

from .runtime import start  # noqa: E402  (the one call a chapter begins with)

__all__ = ["start", "__version__"]
