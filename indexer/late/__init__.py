"""Late interaction (FILIP / ColBERT MaxSim), one room per job:

- ``kernels``: the token products (ONNX Runtime cast + GEMM, blocks on a small thread pool), CSR index helpers.
- ``maxsim``: exact MaxSim scoring of token sets (one scorer, segmented max over slabs).
- ``pipeline``: the PLAID-like search (centroid candidates, centroid pruning, exact scoring) over a token store.
- ``codec``: the residual codec (rotation, Lloyd-Max levels, bit allocation).
- ``pooling``: token pooling (Ward clustering of one row's tokens).
- ``store``: the token store on disk (CSR, memory-mapped): its writer and its reader.
- ``evaluate``: what a token store costs in recall, measured when a segment is written.
"""
