"""mm15: an open, tested implementation of Apple's MM1.5 multimodal LLM family and training recipe.

Importing the package turns on PyTorch's transparent-huge-page allocation for CPU tensors of 2 MB and
more (``THP_MEM_ALLOC_ENABLE=1``) unless the environment already sets it. Without it every large
tensor is fresh memory from the kernel, faulted in 4 KB page by page: writing one image's float tiles
(40 MB) cost more in page faults than the normalisation itself, and preprocessing went from 2.4-2.7x
the time of decoding the image to 1.9x with it (docs/benchmarks.md). PyTorch reads the variable at its
first CPU allocation, so the default takes effect when mm15 is imported before any tensor is made; set
``THP_MEM_ALLOC_ENABLE=0`` to opt out.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
