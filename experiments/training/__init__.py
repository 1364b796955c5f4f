"""The training loop, its guard, evaluations, selection, torchrun and result files (imports config, runfolder, tracking)."""
