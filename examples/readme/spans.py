"""README: bounds-checked pointers."""
import ptrbridge

span = ptrbridge.Span(bytearray(16))
print(len(span[4:]), len(span.offset(8)))
try:
    span[8:32]
except IndexError as exc:
    print("IndexError:", exc)
span.release()
