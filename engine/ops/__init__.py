"""Hot operations, each with a plain torch reference (the oracle in tests).

GPU kernels for the same functions live beside their reference and are chosen per
call by device; the reference runs everywhere.
"""
