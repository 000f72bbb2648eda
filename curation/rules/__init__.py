"""Curation rules that judge one image or URL: unsafe and opted-out domains, perceptual hashes, and which
member of a copy group survives."""
