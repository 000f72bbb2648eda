"""Where work runs: the local Ray head, the CPUs and DataLoader workers a task may use, and the one
CPU-vs-GPU decision."""
