"""Comparing finished runs (imports config, runfolder, tracking's plots); ``compare.py`` is the command line."""
