/* openloop: a single-threaded epoll HTTP/1.1 open-loop load generator.
 *
 * Requests are due on a rate schedule whatever the server does (open loop):
 * a due request goes out on an idle keep-alive connection, or on a new
 * connection while fewer than the cap are open; otherwise it is counted as
 * "unsent" (the generator is at its connection cap), never dropped silently.
 * Latency is measured from the INTENDED send time (no coordinated omission).
 * A request not answered within the timeout (from its intended send time)
 * closes its connection (RST) and counts as a timeout.
 *
 *   openloop -H 127.0.0.1 -p 8000 -f requests.bin -s "-5:3000,0:20000,60:2500"
 *            -a -5 -b 60 -z <t0 epoch ms> [-c 10000] [-T 5] [-r 1]
 *
 *   -f  request templates: raw HTTP/1.1 requests separated by one NUL byte;
 *       "@@@@@@@@@@@@" (12 chars) in a template is replaced at send time by a
 *       zero-padded unique counter (unique Idempotency-Keys), and
 *       "%%%%%%%%%%%%%" (13 chars) by the wall-clock ms the request is written
 *       at (an edge proxy's X-Request-Start). Templates are picked uniformly
 *       at random (seed -r).
 *   -s  piecewise-linear schedule, "t:rate,..." (t in seconds relative to t0,
 *       rate in requests/s; constant before the first and after the last point)
 *   -a/-b  first and last intended send instant, seconds relative to t0
 *   -z  the wall-clock instant (epoch ms) of t = 0, so that per-second rows
 *       line up with it
 *   -c  connection cap; -T per-request timeout (s); -r seed
 *
 * Prints one JSON object on stdout. Always stops by b + T + 1 s.
 * Build: gcc -O2 -o openloop openloop.c  (libc only)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PLACEHOLDER "@@@@@@@@@@@@"
#define PH_LEN 12
/* replaced by the wall-clock ms at which the request is written: the
   arrival stamp an edge proxy adds (X-Request-Start), the generator on
   loopback playing that proxy */
#define TS_PLACEHOLDER "%%%%%%%%%%%%%"
#define TS_LEN 13
#define MAX_KEYS 64
#define MAX_POINTS 256
#define SUB 64          /* linear sub-buckets per power of two (latency, us) */
#define EXPS 40
#define RBUF_INIT 8192
#define RBUF_MAX (4 << 20)

enum { C_FREE = 0, C_CONNECTING, C_IDLE, C_BUSY };
enum {
    E_CONNECT_REFUSED, E_CONNECT_ADDRNOTAVAIL, E_CONNECT_TIMEDOUT, E_CONNECT_OTHER,
    E_SOCKET, E_RESET, E_CLOSED_BEFORE_RESPONSE, E_WRITE, E_READ, E_PARSE, E_COUNT
};
static const char *E_NAMES[E_COUNT] = {
    "connect_refused", "connect_addrnotavail", "connect_timedout", "connect_other",
    "socket", "reset", "closed_before_response", "write", "read", "parse"};

typedef struct conn {
    int fd, state, idx;
    struct conn *prev, *next;   /* idle list */
    char *wbuf; size_t wlen, woff;
    char *rbuf; size_t rlen, rcap;
    int64_t intended_ns;        /* relative to t0 */
    int sec;                    /* row of the intended send second */
    int wsec;                   /* row of the second the request was written in */
    int reused;
} conn;

/* ------------------------------------------------------------------ globals */
static char **tpl; static size_t *tpl_len; static long *tpl_ph, *tpl_ts; static size_t ntpl, tpl_max;
static double pt_t[MAX_POINTS], pt_r[MAX_POINTS]; static int npts;
static double t_start = -1, t_end = 10, timeout_s = 5;
static long long t0_ms = 0;
static int max_conns = 10000;
static uint64_t rng = 88172645463325252ULL;
static struct sockaddr_storage addr; static socklen_t addrlen;

static conn *conns; static int *free_stack; static int nfree;
static conn idle_head;          /* sentinel */
static int nopen, peak_open, nbusy;
static long long opened_total, reused_total;
static int epfd;
static int64_t mono_t0;         /* CLOCK_MONOTONIC ns at t0 */

static char keys[MAX_KEYS][48]; static int nkeys;
static int base_sec, nsec;
static long long *r_offered, *r_sent, *r_unsent, *r_timeouts, *r_errors, *r_answered_at,
    *r_ok_at, *r_ok_written, *r_ans; /* r_ans[sec * MAX_KEYS + key] by intended second */
static long long offered, sent, unsent, answered, timeouts, timeouts_connecting, errors_total;
static long long answered_1s; /* answered within 1 s of the intended send time */
static long long errs[E_COUNT], key_tot[MAX_KEYS];
static long long hist[EXPS * SUB]; static double lat_sum; static int64_t lat_max;
static long long late_1ms, late_10ms, late_100ms; static int64_t late_max_ns;
static int64_t first_ok_ns = INT64_MIN, last_ok_ns = INT64_MIN;
static unsigned long long counter;

/* ------------------------------------------------------------------ helpers */
/* floor/ceil without libm (the build line is plain "gcc -O2") */
static double ffloor(double x) { double t = (double)(long long)x; return t > x ? t - 1 : t; }
static double fceil(double x) { double t = (double)(long long)x; return t < x ? t + 1 : t; }
static int64_t mono_ns(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static int64_t rel_ns(void) { return mono_ns() - mono_t0; }
static uint64_t rnd(void) {
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27; return rng * 2685821657736338717ULL;
}
static double rate_at(double t) {
    if (npts == 0) return 0;
    if (t <= pt_t[0]) return pt_r[0];
    for (int i = 1; i < npts; i++)
        if (t < pt_t[i]) {
            double f = (t - pt_t[i - 1]) / (pt_t[i] - pt_t[i - 1]);
            return pt_r[i - 1] + f * (pt_r[i] - pt_r[i - 1]);
        }
    return pt_r[npts - 1];
}
static int row_of(int64_t ns) {
    int s = (int)ffloor((double)ns / 1e9) - base_sec;
    if (s < 0) s = 0;
    if (s >= nsec) s = nsec - 1;
    return s;
}
static int key_of(const char *k) {
    for (int i = 0; i < nkeys; i++) if (!strcmp(keys[i], k)) return i;
    if (nkeys < MAX_KEYS - 1) { snprintf(keys[nkeys], sizeof keys[0], "%s", k); return nkeys++; }
    for (int i = 0; i < nkeys; i++) if (!strcmp(keys[i], "overflow")) return i;
    snprintf(keys[nkeys], sizeof keys[0], "overflow"); return nkeys++;
}
static void hist_add(int64_t us) {
    if (us < 0) us = 0;
    int idx;
    if (us < SUB) idx = (int)us;
    else {
        int e = 63 - __builtin_clzll((unsigned long long)us);   /* >= 6 */
        int sub = (int)((us >> (e - 6)) & (SUB - 1));
        idx = (e - 5) * SUB + sub;
        if (idx >= EXPS * SUB) idx = EXPS * SUB - 1;
    }
    hist[idx]++;
}
static double hist_value(int idx) {   /* upper edge of the bucket, us */
    if (idx < SUB) return idx;
    int e = idx / SUB + 5, sub = idx % SUB;
    return (double)(((int64_t)(SUB + sub + 1)) << (e - 6));
}
static double percentile(double p) {
    long long n = 0; for (int i = 0; i < EXPS * SUB; i++) n += hist[i];
    if (!n) return 0;
    long long want = (long long)fceil(p / 100.0 * (double)n), c = 0;
    if (want < 1) want = 1;
    for (int i = 0; i < EXPS * SUB; i++) { c += hist[i]; if (c >= want) return hist_value(i); }
    return (double)lat_max / 1000.0;
}

/* ------------------------------------------------------------------ connections */
static void idle_push(conn *c) {
    c->next = idle_head.next; c->prev = &idle_head;
    idle_head.next->prev = c; idle_head.next = c;
}
static void idle_remove(conn *c) {
    if (c->prev) { c->prev->next = c->next; c->next->prev = c->prev; }
    c->prev = c->next = NULL;
}
static void conn_close(conn *c, int rst) {
    if (c->state == C_FREE) return;
    if (c->state == C_IDLE) idle_remove(c);
    if (c->state == C_BUSY || c->state == C_CONNECTING) nbusy--;
    if (rst) { struct linger l = {1, 0}; setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l); }
    close(c->fd);
    c->fd = -1; c->state = C_FREE; c->rlen = 0; c->wlen = c->woff = 0;
    nopen--;
    free_stack[nfree++] = c->idx;
}
static void fail(conn *c, int kind) {   /* the in-flight request failed */
    errs[kind]++; errors_total++; r_errors[c->sec]++;
    conn_close(c, 1);
}
static void set_events(conn *c, uint32_t ev) {
    struct epoll_event e = {.events = ev, .data.u32 = (uint32_t)c->idx};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e);
}
static void do_write(conn *c) {
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n > 0) { c->woff += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_events(c, EPOLLIN | EPOLLOUT | EPOLLRDHUP); return;
        }
        fail(c, errno == ECONNRESET || errno == EPIPE ? E_RESET : E_WRITE); return;
    }
    set_events(c, EPOLLIN | EPOLLRDHUP);
}

/* Parse a complete response in c->rbuf; 1 = complete, 0 = need more, -1 = bad.
 * eof: the peer closed (completes a response delimited by the close). */
static int parse_response(conn *c, int eof, int *status, int *close_after, size_t *body_off,
                          size_t *body_len) {
    char *b = c->rbuf; size_t n = c->rlen;
    char *end = memmem(b, n, "\r\n\r\n", 4);
    if (!end) return n > 65536 ? -1 : 0;
    size_t hlen = (size_t)(end - b) + 4;
    if (n < 12 || strncmp(b, "HTTP/1.", 7)) return -1;
    *status = atoi(b + 9);
    int http10 = b[7] == '0';
    long long cl = -1; int chunked = 0, conn_close_h = 0, conn_keep = 0;
    char *line = memchr(b, '\n', hlen); line = line ? line + 1 : b + hlen;
    while (line < b + hlen - 2) {
        char *eol = memchr(line, '\n', (size_t)(b + hlen - line));
        if (!eol) break;
        size_t ll = (size_t)(eol - line);
        if (ll > 15 && !strncasecmp(line, "content-length:", 15)) cl = atoll(line + 15);
        else if (ll > 18 && !strncasecmp(line, "transfer-encoding:", 18)) {
            if (memmem(line, ll, "chunked", 7)) chunked = 1;
        } else if (ll > 11 && !strncasecmp(line, "connection:", 11)) {
            if (memmem(line, ll, "close", 5) || memmem(line, ll, "Close", 5)) conn_close_h = 1;
            if (memmem(line, ll, "eep-alive", 9)) conn_keep = 1;
        }
        line = eol + 1;
    }
    *close_after = conn_close_h || (http10 && !conn_keep);
    *body_off = hlen;
    if (*status == 204 || *status == 304 || (*status >= 100 && *status < 200)) {
        *body_len = 0; return 1;
    }
    if (chunked) {
        size_t p = hlen;
        for (;;) {
            char *le = memmem(b + p, n - p, "\r\n", 2);
            if (!le) return eof ? -1 : 0;
            unsigned long sz = strtoul(b + p, NULL, 16);
            size_t data = (size_t)(le - b) + 2;
            if (sz == 0) {
                /* trailers (none expected) end with an empty line */
                char *te = memmem(b + data - 2, n - (data - 2), "\r\n\r\n", 4);
                if (!te) return eof ? -1 : 0;
                *body_len = n - hlen;   /* chunk-framed: classification scans it raw */
                return 1;
            }
            if (n < data + sz + 2) return eof ? -1 : 0;
            p = data + sz + 2;
        }
    }
    if (cl >= 0) {
        if (n < hlen + (size_t)cl) return eof ? -1 : 0;
        *body_len = (size_t)cl; return 1;
    }
    /* delimited by the close */
    if (!eof) return 0;
    *close_after = 1; *body_len = n - hlen; return 1;
}

static void finish(conn *c, int status, int close_after, size_t boff, size_t blen) {
    int64_t now = rel_ns();
    char key[48];
    if (status >= 300) {
        char *p = memmem(c->rbuf + boff, blen, "/problems/", 10);
        if (p) {
            p += 10; size_t k = 0; char name[32];
            while (k < sizeof name - 1 && p + k < c->rbuf + boff + blen &&
                   (p[k] == '-' || (p[k] >= 'a' && p[k] <= 'z') || (p[k] >= 'A' && p[k] <= 'Z')
                    || (p[k] >= '0' && p[k] <= '9'))) { name[k] = p[k]; k++; }
            name[k] = 0;
            snprintf(key, sizeof key, "%d:%s", status, k ? name : "other");
        } else snprintf(key, sizeof key, "%d:other", status);
    } else snprintf(key, sizeof key, "%d", status);
    int k = key_of(key);
    answered++; key_tot[k]++;
    r_ans[(size_t)c->sec * MAX_KEYS + k]++;
    int as = row_of(now);
    r_answered_at[as]++;
    if (status == 201) {
        r_ok_at[as]++;
        r_ok_written[c->wsec]++;
        if (first_ok_ns == INT64_MIN) first_ok_ns = now;
        last_ok_ns = now;
    }
    int64_t lat = now - c->intended_ns;
    if (lat <= 1000000000LL) answered_1s++;
    if (lat > lat_max) lat_max = lat;
    lat_sum += (double)lat / 1e6;
    hist_add(lat / 1000);
    if (close_after) { conn_close(c, 0); return; }
    nbusy--;
    c->state = C_IDLE;
    c->rlen = 0;
    set_events(c, EPOLLIN | EPOLLRDHUP);
    idle_push(c);
}

static void do_read(conn *c) {
    for (;;) {
        if (c->rcap - c->rlen < 4096) {
            if (c->rcap >= RBUF_MAX) { fail(c, E_PARSE); return; }
            c->rcap *= 2; c->rbuf = realloc(c->rbuf, c->rcap);
            if (!c->rbuf) { perror("realloc"); exit(2); }
        }
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
        if (n > 0) { c->rlen += (size_t)n; continue; }
        int eof = n == 0;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            if (c->state == C_IDLE) { conn_close(c, 0); return; }
            fail(c, errno == ECONNRESET ? E_RESET : E_READ); return;
        }
        if (c->state == C_IDLE) {   /* the server closed a keep-alive connection */
            if (eof || c->rlen) conn_close(c, 0);
            return;
        }
        int status = 0, close_after = 0; size_t boff = 0, blen = 0;
        int r = c->rlen ? parse_response(c, eof, &status, &close_after, &boff, &blen) : 0;
        if (r == 1) { finish(c, status, close_after || eof, boff, blen); return; }
        if (r < 0) { fail(c, E_PARSE); return; }
        if (eof) { fail(c, c->rlen ? E_PARSE : E_CLOSED_BEFORE_RESPONSE); return; }
        return;   /* EAGAIN, incomplete */
    }
}

static void fill_request(conn *c) {
    size_t t = (size_t)(rnd() % ntpl);
    memcpy(c->wbuf, tpl[t], tpl_len[t]);
    if (tpl_ph[t] >= 0) {
        char num[32];
        snprintf(num, sizeof num, "%012llu", ++counter % 1000000000000ULL);
        memcpy(c->wbuf + tpl_ph[t], num, PH_LEN);
    }
    if (tpl_ts[t] >= 0) {
        char ms[32];
        snprintf(ms, sizeof ms, "%013lld", t0_ms + rel_ns() / 1000000LL);
        memcpy(c->wbuf + tpl_ts[t], ms, TS_LEN);
    }
    c->wsec = row_of(rel_ns());
    c->wlen = tpl_len[t]; c->woff = 0; c->rlen = 0;
}

static void issue(int64_t intended) {
    int s = row_of(intended);
    offered++; r_offered[s]++;
    conn *c = idle_head.next != &idle_head ? idle_head.next : NULL;
    if (c) {
        idle_remove(c);
        c->state = C_BUSY; nbusy++; c->intended_ns = intended; c->sec = s; c->reused = 1;
        reused_total++;
        sent++; r_sent[s]++;
        fill_request(c);
        do_write(c);
        return;
    }
    if (nopen >= max_conns || nfree == 0) { unsent++; r_unsent[s]++; return; }
    c = &conns[free_stack[--nfree]];
    sent++; r_sent[s]++;
    c->intended_ns = intended; c->sec = s; c->reused = 0;
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        free_stack[nfree++] = c->idx;
        errs[E_SOCKET]++; errors_total++; r_errors[s]++; return;
    }
    int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd; nopen++; opened_total++; nbusy++;
    if (nopen > peak_open) peak_open = nopen;
    if (!c->wbuf) { c->wbuf = malloc(tpl_max + 1); c->rbuf = malloc(RBUF_INIT); c->rcap = RBUF_INIT; }
    fill_request(c);
    struct epoll_event e = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)c->idx};
    c->state = C_CONNECTING;
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e);
    if (connect(fd, (struct sockaddr *)&addr, addrlen) == 0) { c->state = C_BUSY; do_write(c); }
    else if (errno != EINPROGRESS) {
        int k = errno == ECONNREFUSED ? E_CONNECT_REFUSED
              : errno == EADDRNOTAVAIL ? E_CONNECT_ADDRNOTAVAIL : E_CONNECT_OTHER;
        fail(c, k);
    }
}

static void on_event(conn *c, uint32_t ev) {
    if (c->state == C_FREE) return;
    if (c->state == C_CONNECTING) {
        if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = 0; socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) {
            fail(c, err == ECONNREFUSED ? E_CONNECT_REFUSED : err == ETIMEDOUT ? E_CONNECT_TIMEDOUT
                  : err == EADDRNOTAVAIL ? E_CONNECT_ADDRNOTAVAIL : E_CONNECT_OTHER);
            return;
        }
        c->state = C_BUSY;
        do_write(c);
        return;
    }
    if (c->state == C_BUSY && (ev & EPOLLOUT) && c->woff < c->wlen) {
        do_write(c);
        if (c->state != C_BUSY) return;
    }
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) do_read(c);
}

static void check_timeouts(int64_t now) {
    int64_t to = (int64_t)(timeout_s * 1e9);
    for (int i = 0; i < max_conns; i++) {
        conn *c = &conns[i];
        if ((c->state == C_BUSY || c->state == C_CONNECTING) && now - c->intended_ns > to) {
            timeouts++; r_timeouts[c->sec]++;
            if (c->state == C_CONNECTING) timeouts_connecting++;
            conn_close(c, 1);
        }
    }
}

/* ------------------------------------------------------------------ setup */
static void load_templates(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    struct stat st; fstat(fileno(f), &st);
    char *buf = malloc((size_t)st.st_size + 1);
    size_t n = fread(buf, 1, (size_t)st.st_size, f); fclose(f);
    buf[n] = 0;
    size_t cap = 1024; tpl = malloc(cap * sizeof *tpl); tpl_len = malloc(cap * sizeof *tpl_len);
    tpl_ph = malloc(cap * sizeof *tpl_ph); tpl_ts = malloc(cap * sizeof *tpl_ts);
    size_t p = 0;
    while (p < n) {
        size_t e = p; while (e < n && buf[e]) e++;
        if (e > p) {
            if (ntpl == cap) {
                cap *= 2; tpl = realloc(tpl, cap * sizeof *tpl);
                tpl_len = realloc(tpl_len, cap * sizeof *tpl_len);
                tpl_ph = realloc(tpl_ph, cap * sizeof *tpl_ph);
                tpl_ts = realloc(tpl_ts, cap * sizeof *tpl_ts);
            }
            tpl[ntpl] = buf + p; tpl_len[ntpl] = e - p;
            char *ph = memmem(buf + p, e - p, PLACEHOLDER, PH_LEN);
            tpl_ph[ntpl] = ph ? ph - (buf + p) : -1;
            char *ts = memmem(buf + p, e - p, TS_PLACEHOLDER, TS_LEN);
            tpl_ts[ntpl] = ts ? ts - (buf + p) : -1;
            if (e - p > tpl_max) tpl_max = e - p;
            ntpl++;
        }
        p = e + 1;
    }
    if (!ntpl) { fprintf(stderr, "openloop: no request templates in %s\n", path); exit(2); }
}
static void parse_schedule(const char *s) {
    char *d = strdup(s), *save = NULL;
    for (char *tok = strtok_r(d, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *colon = strrchr(tok, ':');
        if (!colon || npts >= MAX_POINTS) { fprintf(stderr, "openloop: bad schedule %s\n", s); exit(2); }
        *colon = 0; pt_t[npts] = atof(tok); pt_r[npts] = atof(colon + 1); npts++;
        if (npts > 1 && pt_t[npts - 1] < pt_t[npts - 2]) {
            fprintf(stderr, "openloop: schedule times must not decrease\n"); exit(2);
        }
    }
    free(d);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *port = "8000", *file = NULL, *sched = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "H:p:f:s:a:b:z:c:T:r:")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = optarg; break;
        case 'f': file = optarg; break;
        case 's': sched = optarg; break;
        case 'a': t_start = atof(optarg); break;
        case 'b': t_end = atof(optarg); break;
        case 'z': t0_ms = atoll(optarg); break;
        case 'c': max_conns = atoi(optarg); break;
        case 'T': timeout_s = atof(optarg); break;
        case 'r': rng ^= (uint64_t)atoll(optarg) * 0x9E3779B97F4A7C15ULL; if (!rng) rng = 1; break;
        default:
            fprintf(stderr, "usage: openloop -H host -p port -f requests -s t:rate,... "
                            "-a start -b end -z t0_ms [-c conns] [-T timeout] [-r seed]\n");
            return 2;
        }
    }
    if (!file || !sched || t_end <= t_start || timeout_s <= 0 || max_conns < 1) {
        fprintf(stderr, "openloop: -f, -s and -a < -b are required\n"); return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    load_templates(file);
    parse_schedule(sched);

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai)) { fprintf(stderr, "openloop: bad address\n"); return 2; }
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen); addrlen = ai->ai_addrlen; freeaddrinfo(ai);

    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
    int requested_conns = max_conns;
    if ((rlim_t)max_conns + 32 > rl.rlim_cur) max_conns = (int)rl.rlim_cur - 32;

    conns = calloc((size_t)max_conns, sizeof *conns);
    free_stack = malloc((size_t)max_conns * sizeof *free_stack);
    for (int i = 0; i < max_conns; i++) {
        conns[i].idx = i; conns[i].fd = -1; free_stack[i] = max_conns - 1 - i;
    }
    nfree = max_conns;
    idle_head.next = idle_head.prev = &idle_head;
    epfd = epoll_create1(EPOLL_CLOEXEC);

    base_sec = (int)ffloor(t_start);
    nsec = (int)fceil(t_end + timeout_s) - base_sec + 3;
    r_offered = calloc((size_t)nsec, sizeof(long long)); r_sent = calloc((size_t)nsec, sizeof(long long));
    r_unsent = calloc((size_t)nsec, sizeof(long long)); r_timeouts = calloc((size_t)nsec, sizeof(long long));
    r_errors = calloc((size_t)nsec, sizeof(long long)); r_answered_at = calloc((size_t)nsec, sizeof(long long));
    r_ok_at = calloc((size_t)nsec, sizeof(long long));
    r_ok_written = calloc((size_t)nsec, sizeof(long long));
    r_ans = calloc((size_t)nsec * MAX_KEYS, sizeof(long long));

    /* t0 on the monotonic clock */
    struct timespec rt; clock_gettime(CLOCK_REALTIME, &rt);
    int64_t real_ns = (int64_t)rt.tv_sec * 1000000000LL + rt.tv_nsec;
    mono_t0 = mono_ns() + (t0_ms * 1000000LL - real_ns);

    int64_t start_ns = (int64_t)(t_start * 1e9), end_ns = (int64_t)(t_end * 1e9);
    int64_t hard_stop = end_ns + (int64_t)((timeout_s + 1.0) * 1e9);
    int64_t launched = rel_ns();
    double tn = t_start;     /* next intended send instant, s */
    int issuing = 1;
    int64_t last_scan = 0;
    struct epoll_event evs[1024];
    for (;;) {
        int64_t now = rel_ns();
        if (issuing) {
            int64_t due = (int64_t)(tn * 1e9);
            while (due <= now && due < end_ns) {
                if (due >= start_ns) {
                    int64_t late = now - due;
                    if (late > 1000000) late_1ms++;
                    if (late > 10000000) late_10ms++;
                    if (late > 100000000) late_100ms++;
                    if (late > late_max_ns) late_max_ns = late;
                    issue(due);
                }
                double r = rate_at(tn);
                tn += r > 0 ? 1.0 / r : 0.001;
                due = (int64_t)(tn * 1e9);
            }
            if (due >= end_ns) issuing = 0;
        }
        if (now - last_scan > 10000000) { check_timeouts(now); last_scan = now; }
        if (!issuing && nbusy == 0) break;
        if (now >= hard_stop) break;
        int wait_ms = 20;
        if (issuing) {
            double d = tn * 1e3 - (double)now / 1e6;
            wait_ms = d <= 1 ? 1 : d >= 20 ? 20 : (int)fceil(d);
        }
        int n = epoll_wait(epfd, evs, 1024, wait_ms);
        for (int i = 0; i < n; i++) on_event(&conns[evs[i].data.u32], evs[i].events);
    }
    long long in_flight = 0;
    for (int i = 0; i < max_conns; i++)
        if (conns[i].state == C_BUSY || conns[i].state == C_CONNECTING) {
            in_flight++; timeouts++; r_timeouts[conns[i].sec]++;
        }
    int64_t stopped = rel_ns();

    struct rusage ru; getrusage(RUSAGE_SELF, &ru);
    FILE *o = stdout;
    fprintf(o, "{\"t0_ms\":%lld,\"start_s\":%.3f,\"end_s\":%.3f,\"launched_s\":%.3f,"
               "\"stopped_s\":%.3f,\"timeout_s\":%.3f,",
            t0_ms, t_start, t_end, (double)launched / 1e9, (double)stopped / 1e9, timeout_s);
    fprintf(o, "\"schedule\":[");
    for (int i = 0; i < npts; i++) fprintf(o, "%s[%.3f,%.1f]", i ? "," : "", pt_t[i], pt_r[i]);
    fprintf(o, "],\"templates\":%zu,\"max_conns\":%d,\"max_conns_requested\":%d,"
               "\"nofile_limit\":%llu,",
            ntpl, max_conns, requested_conns, (unsigned long long)rl.rlim_cur);
    fprintf(o, "\"offered\":%lld,\"sent\":%lld,\"unsent\":%lld,\"answered\":%lld,"
               "\"timeouts\":%lld,\"timeouts_while_connecting\":%lld,\"in_flight_at_stop\":%lld,"
               "\"errors\":%lld,",
            offered, sent, unsent, answered, timeouts, timeouts_connecting, in_flight, errors_total);
    fprintf(o, "\"answered_within_1s\":%lld,", answered_1s);
    fprintf(o, "\"errors_by_kind\":{");
    for (int i = 0; i < E_COUNT; i++) fprintf(o, "%s\"%s\":%lld", i ? "," : "", E_NAMES[i], errs[i]);
    fprintf(o, "},\"answers\":{");
    for (int i = 0; i < nkeys; i++) fprintf(o, "%s\"%s\":%lld", i ? "," : "", keys[i], key_tot[i]);
    fprintf(o, "},\"connections_opened\":%lld,\"requests_on_reused_connections\":%lld,"
               "\"peak_open_connections\":%d,", opened_total, reused_total, peak_open);
    fprintf(o, "\"latency_ms\":{\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"p999\":%.2f,"
               "\"mean\":%.2f,\"max\":%.2f},",
            percentile(50) / 1e3, percentile(90) / 1e3, percentile(99) / 1e3,
            percentile(99.9) / 1e3, answered ? lat_sum / (double)answered : 0.0,
            (double)lat_max / 1e6);
    fprintf(o, "\"issued_late\":{\"over_1ms\":%lld,\"over_10ms\":%lld,\"over_100ms\":%lld,"
               "\"max_ms\":%.2f},", late_1ms, late_10ms, late_100ms, (double)late_max_ns / 1e6);
    if (first_ok_ns != INT64_MIN)
        fprintf(o, "\"first_ok_ms\":%.1f,\"last_ok_ms\":%.1f,",
                (double)first_ok_ns / 1e6, (double)last_ok_ns / 1e6);
    else fprintf(o, "\"first_ok_ms\":null,\"last_ok_ms\":null,");
    fprintf(o, "\"cpu_s\":{\"user\":%.3f,\"sys\":%.3f},",
            (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
            (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
    fprintf(o, "\"rows\":[");
    int first = 1;
    for (int s = 0; s < nsec; s++) {
        long long any = r_offered[s] + r_answered_at[s] + r_timeouts[s] + r_errors[s]
                        + r_ok_written[s];
        if (!any) continue;
        fprintf(o, "%s{\"t\":%d,\"offered\":%lld,\"sent\":%lld,\"unsent\":%lld,\"timeouts\":%lld,"
                   "\"errors\":%lld,\"answered_at\":%lld,\"ok_at\":%lld,\"ok_written\":%lld,"
                   "\"answered\":{",
                first ? "" : ",", s + base_sec, r_offered[s], r_sent[s], r_unsent[s],
                r_timeouts[s], r_errors[s], r_answered_at[s], r_ok_at[s], r_ok_written[s]);
        first = 0;
        int f2 = 1;
        for (int k = 0; k < nkeys; k++) {
            long long v = r_ans[(size_t)s * MAX_KEYS + k];
            if (!v) continue;
            fprintf(o, "%s\"%s\":%lld", f2 ? "" : ",", keys[k], v); f2 = 0;
        }
        fprintf(o, "}}");
    }
    fprintf(o, "]}\n");
    return 0;
}
