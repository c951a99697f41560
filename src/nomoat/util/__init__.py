"""The bottom layer: small helpers every other part of nomoat uses (atomic files, hashing, JSON, errors)."""
