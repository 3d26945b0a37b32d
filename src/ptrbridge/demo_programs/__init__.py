"""Small cffi programs written the way a user who never heard of ptrbridge writes them.

``python -m ptrbridge demo`` runs each plainly and under ``python -m ptrbridge
run`` (they are files here so that they run unchanged, as a user's would):

* ``gather.py`` - a use-after-free: ``writev()`` reads iovec bases that were
  freed before the call; ``gather_fixed.py`` is its correct twin;
* ``stdio_buffer.py`` - C keeps a pointer: ``setvbuf()`` keeps a temporary
  buffer as the stream's, and the next write lands in freed memory.
"""
import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """The path of the program ``name`` (e.g. ``"gather.py"``)."""
    return os.path.join(DIRECTORY, name)
