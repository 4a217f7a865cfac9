"""Operations, their LMDB store and the one function that applies them."""
