"""Entropy coding: integer CDF tables, the rANS coder and symbol checksums.

No torch here: integer symbols and integer tables in, bytes out.
"""

from .rans import (CdfTables, decode_many, decode_symbols, encode_many, encode_symbols,
                   load_in_background, symbol_checksum)

__all__ = ["CdfTables", "decode_many", "decode_symbols", "encode_many", "encode_symbols",
           "load_in_background", "symbol_checksum"]
