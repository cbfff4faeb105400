"""This device's identity: ids and fingerprints, keys and certificate on disk, key rotation."""
