/*
 * checked.h - declarations of checked.c; the block between the markers is
 * also the cffi cdef the tests use (tests/conftest.py reads it).
 */
#ifndef CHECKED_H
#define CHECKED_H

#include <stddef.h>

/* CDEF_BEGIN */
struct person { const char *name; int age; };
struct node { struct node *next; const char *label; };
union value { const char *text; long number; };
struct holder { struct person who; union value v; const char **names; int count; struct person team[2]; };
int person_name_len(const struct person *p);
int person_by_value_len(struct person p);
int names_total(const char **names, int n);
int team_total(const struct person *team, int n);
int holder_total(const struct holder *h);
int list_total(const struct node *n);
int text_len(const char *s);
int add(int a, int b);
int fail_with(int code);
void *null_pointer(void);
int is_null(const void *p);
int is_null_text(const char *p);
int is_null_int(const int *p);
unsigned long long address_seen(const char *p);
int fill_calling(char *buf, int n, int (*progress)(int));
int each_word(const char *text, int (*on_word)(const char *start, int len));
unsigned long thread_id(void);
void counter_bump(int times);
long counter_value(void);
void counter_reset(void);
void gate_reset(void);
void gate_pass(void);
void gate_wait_inside(int n);
void gate_open(void);
int gate_most_inside(void);
long read_into(int fd, char *buf, long n);
long wait_then_len(int fd, const char *text);
int call_each(int (*fn)(int), int n);
int call_with_userdata(int (*fn)(void *, int), void *userdata, int n);
void keep_userdata(int (*fn)(void *, int), void *userdata);
int call_kept_userdata(int arg);
int call_get_len(const char *(*fn)(int), int arg);
int call_on_thread(int (*fn)(int), int arg);
int call_get_len_on_thread(const char *(*fn)(int), int arg);
struct pb_iov { void *base; size_t len; };
struct pb_msg { void *name; int namelen; struct pb_iov *iov; int iovlen; void *control; size_t controllen; };
void keep_callback(int (*fn)(int));
int call_kept(int arg);
int call_kept_on_thread(int arg);
long iov_sum(const struct pb_iov *iov, int n);
long msg_sum(const struct pb_msg *msg);
/* CDEF_END */

#endif
