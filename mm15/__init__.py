"""mm15: an open, tested implementation of Apple's MM1.5 multimodal LLM family and training recipe.

Importing the package turns on PyTorch's transparent-huge-page allocation for CPU tensors of 2 MB and
more (``THP_MEM_ALLOC_ENABLE=1``) unless the environment already sets it. Without it every large
tensor is fresh memory from the kernel, faulted in 4 KB page by page, and one image's float tiles are
about 40 MB: with it, float preprocessing went from 2.6-2.8x the time of decoding the image to 2.0-2.4x,
and the tiny recipe's SFT ran about 14% faster (docs/benchmarks.md, docs/demo.md). PyTorch reads the
variable at its first CPU allocation, so the default takes effect when mm15 is imported before any
tensor is made; set ``THP_MEM_ALLOC_ENABLE=0`` to opt out.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
