"""Run folders: file names and formats, the folder a command maps to, the one-run lock, and what a run
finds there at start (imports config only)."""
