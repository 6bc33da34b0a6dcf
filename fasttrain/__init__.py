"""fasttrain: the helper library of the course "Training image classifiers fast".

Each module holds one idea: `device` (where and in what precision to compute),
`profiles` (smoke or full), `data` (CIFAR-10, digits, batches on the device), `train`
(the fit loop and its callbacks), `board` (live curves), `results` (targets and
results records). Later chapters add their own modules.
"""

__version__ = "0.1.0"
