"""What a short device lease runs: prepared checks and figures carried onto an accelerator
(`cuda_lease.sh` stages `cuda_check` and `step_profile`)."""
