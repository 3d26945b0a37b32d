/*
 * pbkafka.h - delivery reports of a librdkafka producer, handled in C.
 *
 * The Python producer (pbkafka.py) hands librdkafka message payloads that
 * librdkafka queues for its broker threads and reads long after produce()
 * returned.  Each produce call belongs to a *batch*: a record in tracked C
 * memory (pb_malloc) with one result slot per message; a message's
 * msg_opaque points to its slot.  The delivery-report callback (called by
 * rd_kafka_poll() on the polling thread, without the GIL) fills the slot and,
 * when the last message of a batch is reported, gives back what kept the
 * payloads valid:
 *
 *   PBK_COPY    the payloads are one CBuffer Python transferred to C:
 *               pb_free(block);
 *   PBK_HANDLE  the payloads are zero-copy, kept alive by a ptrbridge Handle:
 *               pb_handle_release(token);
 *   PBK_PIN     the payloads are zero-copy, pinned by a Pinner that Python
 *               unpins at the drain after the one that took the batch
 *               (librdkafka may reference a payload from its ProduceRequest
 *               buffer until just after it queued the reports).
 *
 * and appends the batch to the producer's completion queue (token, error
 * count), which Python drains in bulk with pbk_drain().
 *
 * Thread-safety: every function may be called from any thread; a producer's
 * completion queue is protected by its own mutex.  No function calls Python.
 * The lines between PBK_CDEF_BEGIN and PBK_CDEF_END are read by cffi
 * (pbkafka_build.py).
 */
#ifndef PBKAFKA_H
#define PBKAFKA_H

#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>

/* PBK_CDEF_BEGIN */

enum pbk_kind {
    PBK_COPY = 1,    /* block: a transferred CBuffer, pb_free'd on completion */
    PBK_HANDLE = 2,  /* token: a Handle, pb_handle_release'd on completion */
    PBK_PIN = 3      /* nothing in C: Python unpins at the drain after this one */
};

/* The delivery report of one message (40 bytes; Python reads the array). */
struct pbk_result {
    int64_t offset;          /* offset in the partition, -1 if not delivered */
    int64_t latency_us;      /* rd_kafka_message_latency(): produce() to report */
    int32_t partition;       /* partition the message went to */
    int32_t err;             /* rd_kafka_resp_err_t, 0 = delivered */
    void *payload;           /* the payload while librdkafka holds it, NULL after the
                                report: kept in tracked C memory on purpose, so that
                                ptrbridge's level-2 scan sees what librdkafka holds */
    struct pbk_batch *batch; /* the batch this slot belongs to */
};

struct pbk_batch {
    uint64_t id;               /* nonzero, unique per producer */
    uint32_t n;                /* messages in the batch */
    uint32_t failed;           /* messages whose err is not 0 (final once drained) */
    uint32_t remaining;        /* messages not reported yet (atomic) */
    int32_t release_status;    /* PB_OK or the pb_free / pb_handle_release error */
    int kind;                  /* enum pbk_kind */
    uintptr_t token;           /* PBK_HANDLE: the Handle token */
    void *block;               /* PBK_COPY: the transferred CBuffer (NULL once freed) */
    struct pbk_producer *producer;
    struct pbk_batch *next;    /* completion queue link */
    struct pbk_result *results; /* n slots, a tracked block of their own: each block holds
                                   exactly what the pointer to it says (one batch, n
                                   results), as ptrbridge's checks read a T * into a block */
};

struct pbk_producer;

/* A producer's completion queue.  Returns NULL if out of memory.  The caller
 * owns it: pbk_producer_free() after rd_kafka_destroy(). */
struct pbk_producer *pbk_producer_new(void);

/* Frees the producer and every batch still in its completion queue (their
 * resources were already released).  NULL is ignored. */
void pbk_producer_free(struct pbk_producer *p);

/* Installs the delivery-report callback and `p` as the opaque of `conf`.
 * Call before rd_kafka_new(conf, ...). */
void pbk_conf_install(rd_kafka_conf_t *conf, struct pbk_producer *p);

/* A new batch of `n` messages (n >= 1) in tracked C memory.  For PBK_COPY,
 * `block` is the transferred CBuffer holding the payloads back to back (the
 * batch now owns it); for PBK_HANDLE, `token` is the Handle keeping the
 * payloads alive (the batch now owns it).  Returns NULL if out of memory or
 * n is 0; then nothing was taken over.  After the last message is
 * reported (or abandoned) the batch appears in pbk_drain(). */
struct pbk_batch *pbk_batch_new(struct pbk_producer *p, int kind, uint32_t n,
                                void *block, uintptr_t token);

/* Produces messages start..n-1 of `b` to (rkt, partition), zero-copy
 * (msgflags 0: librdkafka neither copies nor frees the payload).  Payload i
 * is payloads[i] with length lens[i]; if `payloads` is NULL the payloads are
 * consecutive slices of b's block.  Stops at the first message librdkafka
 * refuses: stores its index in *next and returns the error (for
 * RD_KAFKA_RESP_ERR__QUEUE_FULL poll and call again from *next; otherwise
 * call pbk_batch_abandon).  Returns 0 when every message was enqueued
 * (*next == n).  Thread-safe as rd_kafka_produce. */
int pbk_produce(rd_kafka_topic_t *rkt, int32_t partition, struct pbk_batch *b,
                uint32_t start, char **payloads, const size_t *lens, uint32_t *next);

/* Produces message `index` of `b` from `payload` (zero-copy, msgflags 0).
 * Returns 0 and sets *next to index + 1, or returns librdkafka's error (the
 * message was not enqueued) and sets *next to index. */
int pbk_produce_one(rd_kafka_topic_t *rkt, int32_t partition, struct pbk_batch *b,
                    uint32_t index, char *payload, size_t len, uint32_t *next);

/* Marks messages from..n-1 of `b`, never enqueued, as failed with `err`, as
 * if their delivery reports had arrived.  Then no message of b is left in C
 * (the batch completes when the enqueued ones are reported). */
void pbk_batch_abandon(struct pbk_batch *b, uint32_t from, int32_t err);

/* Moves up to `max` completed batches to out[] (oldest first) and returns
 * how many.  The caller owns them now: read them, then pbk_batch_free(). */
size_t pbk_drain(struct pbk_producer *p, struct pbk_batch **out, size_t max);

/* Batches produced and not yet drained. */
uint64_t pbk_inflight(struct pbk_producer *p);

/* The result slots of a batch (n of them). */
struct pbk_result *pbk_batch_results(struct pbk_batch *b);

/* Frees a drained batch.  NULL is ignored. */
void pbk_batch_free(struct pbk_batch *b);

/* ptrbridge's text for a PB_* status (pb_strerror).  Never NULL. */
const char *pbk_strerror(int status);

/* PBK_CDEF_END */

#endif /* PBKAFKA_H */
