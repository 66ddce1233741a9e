/* LD_PRELOAD shim for the OpenSSL clients of tls.sh (wrk, h2load).
 *
 * - Counts the TLS handshakes the client completes and how many of them resumed a
 *   session; at exit appends "handshakes N resumed M" to the file $TLS_SHIM_STATS
 *   (only from a process that made a handshake).
 * - With TLS_SHIM_NO_RESUME=1 the client never offers a saved session, so every
 *   connection makes a full handshake. Left alone, both clients resume with a TLS 1.3
 *   PSK: wrk keeps the previous connection's session in its SSL object (SSL_clear)
 *   and h2load hands one to SSL_set_session. Dropping the session just before a
 *   handshake starts undoes either.
 *
 * Needs no OpenSSL headers: the few functions are declared here and resolved from
 * the client's own libssl at run time.
 *
 *   cc -O2 -shared -fPIC -o tls_client_shim.so tls_client_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
int SSL_in_before(const SSL *s);
int SSL_set_session(SSL *s, SSL_SESSION *session);
int SSL_session_reused(const SSL *s);

static unsigned long handshakes, resumed;
static int used, no_resume = -1, depth;

static void before(SSL *s) {
    used = 1;
    if (no_resume < 0) {
        const char *v = getenv("TLS_SHIM_NO_RESUME");
        no_resume = v && v[0] == '1';
    }
    if (no_resume && SSL_in_before(s)) SSL_set_session(s, NULL);
}

static int after(SSL *s, int rc) {
    if (rc == 1) {
        handshakes++;
        if (SSL_session_reused(s)) resumed++;
    }
    return rc;
}

/* SSL_connect may call SSL_do_handshake through the PLT: count the outer call only. */
static int wrap(const char *name, int (**real)(SSL *), SSL *s) {
    int rc;
    if (!*real) *real = (int (*)(SSL *))dlsym(RTLD_NEXT, name);
    before(s);
    depth++;
    rc = (*real)(s);
    depth--;
    return depth ? rc : after(s, rc);
}

int SSL_connect(SSL *s) {
    static int (*real)(SSL *);
    return wrap("SSL_connect", &real, s);
}

int SSL_do_handshake(SSL *s) {
    static int (*real)(SSL *);
    return wrap("SSL_do_handshake", &real, s);
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("TLS_SHIM_STATS");
    FILE *f;
    if (!used || !path || !(f = fopen(path, "a"))) return;
    fprintf(f, "handshakes %lu resumed %lu\n", handshakes, resumed);
    fclose(f);
}
