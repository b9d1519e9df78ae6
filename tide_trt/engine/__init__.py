"""Target engines: one interface (TargetEngine), backends `torch` (reference, CPU/CUDA) and `trtllm`."""
