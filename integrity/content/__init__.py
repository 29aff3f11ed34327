"""Kept content: small text files stored (redacted, compressed, by digest) so that a
change shows as a diff and a tampered file can be put back; secrets never kept.

`keep` decides what is stored of a file, `read_verified` reads a file's bytes only if
they are the bytes a scan hashed, `unified` renders diffs, `restore` writes a file
back atomically. The store's `contents` table holds the texts; an entry's `kept`
column (sealed with the entry) names the text it refers to.
"""
