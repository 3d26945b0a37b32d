/*
 * pbkafka.c - the delivery-report side of the ptrbridge Kafka producer.
 *
 * See pbkafka.h.  The delivery-report callback runs inside rd_kafka_poll()
 * on the thread that polls (cffi released the GIL); it never calls Python.
 * The ptrbridge functions it calls (pb_free, pb_handle_release) need no GIL
 * and are found by name: `import ptrbridge` makes them global before this
 * module is loaded.
 */
#include "pbkafka.h"

#include <pthread.h>
#include <string.h>

#include "ptrbridge.h"

struct pbk_producer {
    pthread_mutex_t lock;       /* protects the completion queue and counters */
    struct pbk_batch *head;     /* oldest completed batch */
    struct pbk_batch *tail;
    uint64_t next_id;
    uint64_t inflight;          /* batches created and not drained */
};

struct pbk_producer *pbk_producer_new(void)
{
    struct pbk_producer *p = pb_calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    if (pthread_mutex_init(&p->lock, NULL) != 0) {
        pb_free(p);
        return NULL;
    }
    p->next_id = 1;
    return p;
}

void pbk_producer_free(struct pbk_producer *p)
{
    if (p == NULL)
        return;
    struct pbk_batch *b = p->head;
    while (b != NULL) {
        struct pbk_batch *next = b->next;
        pbk_batch_free(b);
        b = next;
    }
    pthread_mutex_destroy(&p->lock);
    pb_free(p);
}

struct pbk_result *pbk_batch_results(struct pbk_batch *b)
{
    return b->results;
}

struct pbk_batch *pbk_batch_new(struct pbk_producer *p, int kind, uint32_t n,
                                void *block, uintptr_t token)
{
    if (p == NULL || n == 0)
        return NULL;
    struct pbk_batch *b = pb_malloc(sizeof *b);
    if (b == NULL)
        return NULL;
    memset(b, 0, sizeof *b);
    b->results = pb_malloc((size_t)n * sizeof(struct pbk_result));
    if (b->results == NULL) {
        pb_free(b);
        return NULL;
    }
    b->n = n;
    b->remaining = n;
    b->kind = kind;
    b->token = token;
    b->block = block;
    b->producer = p;
    struct pbk_result *r = pbk_batch_results(b);
    for (uint32_t i = 0; i < n; i++) {
        r[i].offset = -1;
        r[i].latency_us = -1;
        r[i].partition = -1;
        r[i].err = 0;
        r[i].payload = NULL;
        r[i].batch = b;
    }
    pthread_mutex_lock(&p->lock);
    b->id = p->next_id++;
    p->inflight++;
    pthread_mutex_unlock(&p->lock);
    return b;
}

/* The last message of `b` was reported: give back what kept the payloads
 * valid, then queue the batch for Python. */
static void batch_complete(struct pbk_batch *b)
{
    struct pbk_result *r = pbk_batch_results(b);
    uint32_t failed = 0;
    for (uint32_t i = 0; i < b->n; i++)
        failed += r[i].err != 0;
    b->failed = failed;
    b->release_status = PB_OK;
    if (b->kind == PBK_COPY && b->block != NULL) {
        b->release_status = pb_free(b->block);
        b->block = NULL;
    } else if (b->kind == PBK_HANDLE && b->token != 0) {
        b->release_status = pb_handle_release(b->token);
    }
    struct pbk_producer *p = b->producer;
    b->next = NULL;
    pthread_mutex_lock(&p->lock);
    if (p->tail != NULL)
        p->tail->next = b;
    else
        p->head = b;
    p->tail = b;
    pthread_mutex_unlock(&p->lock);
}

static void count_down(struct pbk_batch *b, uint32_t k)
{
    if (__atomic_sub_fetch(&b->remaining, k, __ATOMIC_ACQ_REL) == 0)
        batch_complete(b);
}

/* librdkafka's delivery-report callback: one call per message, success or
 * failure, on the polling thread. */
static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    struct pbk_result *r = m->_private;
    if (r == NULL)
        return; /* not one of ours */
    r->err = (int32_t)m->err;
    r->partition = m->partition;
    r->offset = m->err ? -1 : m->offset;
    r->latency_us = rd_kafka_message_latency(m);
    r->payload = NULL; /* librdkafka is done with it */
    count_down(r->batch, 1);
}

void pbk_conf_install(rd_kafka_conf_t *conf, struct pbk_producer *p)
{
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    rd_kafka_conf_set_opaque(conf, p);
}

int pbk_produce(rd_kafka_topic_t *rkt, int32_t partition, struct pbk_batch *b,
                uint32_t start, char **payloads, const size_t *lens, uint32_t *next)
{
    struct pbk_result *r = pbk_batch_results(b);
    char *cursor = NULL;
    if (payloads == NULL) {
        cursor = b->block;
        for (uint32_t i = 0; i < start; i++)
            cursor += lens[i];
    }
    for (uint32_t i = start; i < b->n; i++) {
        char *payload = payloads != NULL ? payloads[i] : cursor;
        r[i].payload = payload;
        if (rd_kafka_produce(rkt, partition, 0, payload, lens[i], NULL, 0, &r[i]) != 0) {
            r[i].payload = NULL;
            *next = i;
            return (int)rd_kafka_last_error();
        }
        if (cursor != NULL)
            cursor += lens[i];
    }
    *next = b->n;
    return 0;
}

int pbk_produce_one(rd_kafka_topic_t *rkt, int32_t partition, struct pbk_batch *b,
                    uint32_t index, char *payload, size_t len, uint32_t *next)
{
    *next = index;
    if (index >= b->n)
        return RD_KAFKA_RESP_ERR__INVALID_ARG;
    struct pbk_result *r = &pbk_batch_results(b)[index];
    r->payload = payload;
    if (rd_kafka_produce(rkt, partition, 0, payload, len, NULL, 0, r) != 0) {
        r->payload = NULL;
        return (int)rd_kafka_last_error();
    }
    *next = index + 1;
    return 0;
}

void pbk_batch_abandon(struct pbk_batch *b, uint32_t from, int32_t err)
{
    if (from >= b->n)
        return;
    struct pbk_result *r = pbk_batch_results(b);
    for (uint32_t i = from; i < b->n; i++) {
        r[i].err = err;
        r[i].offset = -1;
        r[i].payload = NULL;
    }
    count_down(b, b->n - from);
}

size_t pbk_drain(struct pbk_producer *p, struct pbk_batch **out, size_t max)
{
    size_t k = 0;
    pthread_mutex_lock(&p->lock);
    while (k < max && p->head != NULL) {
        struct pbk_batch *b = p->head;
        p->head = b->next;
        b->next = NULL;
        out[k++] = b;
    }
    if (p->head == NULL)
        p->tail = NULL;
    p->inflight -= k;
    pthread_mutex_unlock(&p->lock);
    return k;
}

uint64_t pbk_inflight(struct pbk_producer *p)
{
    pthread_mutex_lock(&p->lock);
    uint64_t n = p->inflight;
    pthread_mutex_unlock(&p->lock);
    return n;
}

void pbk_batch_free(struct pbk_batch *b)
{
    if (b != NULL) {
        pb_free(b->results);
        pb_free(b);
    }
}

const char *pbk_strerror(int status)
{
    return pb_strerror(status);
}
