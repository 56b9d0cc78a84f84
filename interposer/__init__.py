"""gpuwatch.interposer: the preload library that enforces quotas and swaps memory (C, built by install.sh)."""
