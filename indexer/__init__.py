"""Everything about an index: corpus readers, batch encoding, FAISS, the on-disk bundle, publishing, search.

Imports no HTTP framework and no Redis.
"""
