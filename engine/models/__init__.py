"""Model families, one file each, and the loader that fills them."""
