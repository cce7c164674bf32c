"""The engine: precision (``auto``), launch checks, the Lightning strategy over a task's blocks (FSDP), the global
batch and LR scaling, ``torch.compile`` of blocks, and how blocks are found."""
