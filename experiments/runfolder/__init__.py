"""Run folders: file names, the folder a command maps to, the run lock, what a run finds at start (imports config)."""
