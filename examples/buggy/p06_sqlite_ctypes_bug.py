import ctypes

# ctypes + libsqlite3: sqlite3_bind_text(..., SQLITE_STATIC) with a temporary bytes that dies before step().
sq = ctypes.CDLL("libsqlite3.so.0")
vp, SQLITE_STATIC = ctypes.c_void_p, ctypes.c_void_p(0)
sq.sqlite3_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(vp)]
sq.sqlite3_exec.argtypes = [vp, ctypes.c_char_p, vp, vp, vp]
sq.sqlite3_prepare_v2.argtypes = [vp, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(vp), vp]
sq.sqlite3_bind_text.argtypes = [vp, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, vp]
sq.sqlite3_step.argtypes = sq.sqlite3_reset.argtypes = sq.sqlite3_finalize.argtypes = [vp]
sq.sqlite3_column_text.argtypes, sq.sqlite3_column_text.restype = [vp, ctypes.c_int], ctypes.c_char_p

db, st = vp(), vp()
sq.sqlite3_open(b":memory:", ctypes.byref(db))
sq.sqlite3_exec(db, b"CREATE TABLE users(name TEXT)", None, None, None)
sq.sqlite3_prepare_v2(db, b"INSERT INTO users VALUES (?)", -1, ctypes.byref(st), None)


def bind_name(i):
    name = ("user-%04d|" % i * 30).encode()
    sq.sqlite3_bind_text(st, 1, name, len(name), SQLITE_STATIC)   # BUG: sqlite keeps name until step()


for i in range(5):
    bind_name(i)
    junk = [bytes([48 + j % 10]) * 300 for j in range(50)]
    assert sq.sqlite3_step(st) == 101          # SQLITE_DONE: the row is written now, from name
    sq.sqlite3_reset(st)
sq.sqlite3_finalize(st)
sq.sqlite3_prepare_v2(db, b"SELECT name FROM users", -1, ctypes.byref(st), None)
rows = []
while sq.sqlite3_step(st) == 100:
    rows.append(sq.sqlite3_column_text(st, 0))
sq.sqlite3_finalize(st)
print(rows[0][:20])
print("CORRECT" if rows == [("user-%04d|" % i * 30).encode() for i in range(5)] else "WRONG")
