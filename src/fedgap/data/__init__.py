"""Data: IDX files (read + verify), data sets held in memory as tensors, partitions over clients."""
