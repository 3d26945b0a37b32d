import cffi

# cffi ABI mode + libsqlite3: bind_text with SQLITE_STATIC and an ffi.new buffer freed before step().
ffi = cffi.FFI()
ffi.cdef("""typedef struct sqlite3 sqlite3; typedef struct sqlite3_stmt sqlite3_stmt;
int sqlite3_open(const char *, sqlite3 **); int sqlite3_close(sqlite3 *);
int sqlite3_exec(sqlite3 *, const char *, void *, void *, char **);
int sqlite3_prepare_v2(sqlite3 *, const char *, int, sqlite3_stmt **, const char **);
int sqlite3_bind_text(sqlite3_stmt *, int, const char *, int, void (*)(void *));
int sqlite3_step(sqlite3_stmt *); int sqlite3_reset(sqlite3_stmt *); int sqlite3_finalize(sqlite3_stmt *);
const unsigned char *sqlite3_column_text(sqlite3_stmt *, int);""")
sq = ffi.dlopen("libsqlite3.so.0")
SQLITE_STATIC = ffi.cast("void (*)(void *)", 0)
pdb, pst = ffi.new("sqlite3 **"), ffi.new("sqlite3_stmt **")
sq.sqlite3_open(b":memory:", pdb)
db = pdb[0]
sq.sqlite3_exec(db, b"CREATE TABLE log(msg TEXT)", ffi.NULL, ffi.NULL, ffi.NULL)
sq.sqlite3_prepare_v2(db, b"INSERT INTO log VALUES (?)", -1, pst, ffi.NULL)
st = pst[0]


def bind(text):
    buf = ffi.new("char[]", text)
    sq.sqlite3_bind_text(st, 1, buf, len(text), SQLITE_STATIC)   # BUG: buf is freed when bind() returns


msgs = [b"event %03d: " % i + b"x" * 200 for i in range(4)]
for m in msgs:
    bind(m)
    junk = [ffi.new("char[]", b"J" * 211) for _ in range(20)]
    assert sq.sqlite3_step(st) == 101
    sq.sqlite3_reset(st)
sq.sqlite3_finalize(st)
sq.sqlite3_prepare_v2(db, b"SELECT msg FROM log", -1, pst, ffi.NULL)
rows = []
while sq.sqlite3_step(pst[0]) == 100:
    rows.append(ffi.string(sq.sqlite3_column_text(pst[0], 0)))
sq.sqlite3_finalize(pst[0])
sq.sqlite3_close(db)
print(rows[0][:16], "CORRECT" if rows == msgs else "WRONG")
