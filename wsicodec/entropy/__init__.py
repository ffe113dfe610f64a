"""Entropy coding: integer CDF tables, the rANS coder adapter and symbol checksums.

No torch here: integer symbols and integer tables in, bytes out.
"""

from .rans import CdfTables, decode_symbols, encode_symbols, symbol_checksum

__all__ = ["CdfTables", "encode_symbols", "decode_symbols", "symbol_checksum"]
