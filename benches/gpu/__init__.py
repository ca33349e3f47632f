"""GPU benchmarks of the xlard ops (skipped without CUDA) and the helpers of scripts/gpu_check.sh."""
