"""The training loop: game set-up, epochs of act / step / learn, divergence guard, per-epoch evaluation
and selection, torchrun, the final evaluation and result files (imports config, runfolder, tracking)."""
