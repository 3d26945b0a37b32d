"""README: what is still live, and where it was made."""
import ptrbridge

h = ptrbridge.Handle({"request": 1})
buf = ptrbridge.CBuffer.copy(b"still mine")
for r in ptrbridge.stats.live_resources():
    print(r.kind, r.description, r.created_at)
try:
    ptrbridge.free(buf.ptr)                # a live CBuffer owns it: refused, never a corrupted heap
except ptrbridge.NotOwnedError as exc:
    print(type(exc).__name__)
h.delete()
buf.free()
