"""The torch toolkit the checks share (private): the user's state saved and restored, and
randomness (dropout neutralised at the ops, remaining random draws detected).

Names without an underscore here are shared across the package's modules; nothing
in this subpackage is public API.
"""
