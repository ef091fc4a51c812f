/*
 * hs_scan: the Hyperscan baseline of `cargo xtask bench rules`.
 *
 * Compiles every pattern of PATTERNS (one regex per line, as exported by rules_bench:
 * each rule's regex, or its keywords as escaped literals) into one Hyperscan database,
 * then scans every regular file of CORPUS_DIR in block mode, one call per file (one per
 * API body, as the agent sees them), single-threaded, pass after pass until at least
 * SECONDS have passed.
 *
 * Flags: HS_FLAG_CASELESS (the rules are written for the agent's lower-cased normalised
 * text; Hyperscan is given the raw bodies, with no normalisation or decoding, so caseless
 * matching stands in for the lower-casing), HS_FLAG_SINGLEMATCH (a rule either matches a
 * body or not, as for the agent's findings), and HS_FLAG_UTF8 for patterns with non-ASCII
 * characters or Unicode properties. Patterns Hyperscan rejects are named on stderr and
 * skipped.
 *
 * Usage: hs_scan PATTERNS CORPUS_DIR SECONDS
 * Prints one JSON line:
 *   {"mbps":..., "bytes_per_pass":..., "files":..., "passes":..., "seconds":...,
 *    "patterns":N, "skipped":M, "matches":K, "bodies_matched":B, "hs_version":"...",
 *    "bodies_matched_by_line":{"LINE":COUNT,...}}
 * where matches counts the (pattern, body) pairs that matched in the first pass, and
 * bodies_matched_by_line the bodies each pattern (by its line in PATTERNS) matched.
 *
 * Build: gcc -O2 -o target/hs_scan tests/bench/hs_scan.c $(pkg-config --cflags --libs libhs)
 */

#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <hs.h>

struct body {
    char *data;
    size_t len;
};

static void die(const char *what) {
    fprintf(stderr, "hs_scan: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) die("out of memory");
    return p;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    size_t cap = 1 << 16, n = 0;
    char *buf = xrealloc(NULL, cap);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) buf = xrealloc(buf, cap *= 2);
    }
    if (ferror(f)) die(path);
    fclose(f);
    *len = n;
    return buf;
}

/* Unicode property classes and non-ASCII bytes need UTF-8 mode. */
static int needs_utf8(const char *re) {
    for (const unsigned char *p = (const unsigned char *)re; *p; p++) {
        if (*p >= 0x80) return 1;
    }
    return strstr(re, "\\p") != NULL || strstr(re, "\\P") != NULL || strstr(re, "\\X") != NULL;
}

static double now(void) {
    struct timespec ts;
    /* CPU time of this (only) thread: the machine may be shared. */
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Counts each (pattern, body) pair once: SINGLEMATCH reports a pattern at most once per
 * scan. On the first pass, also by pattern (ids are line numbers). */
struct counts {
    unsigned long long hits;
    unsigned long long *by_line;
};

static int on_match(unsigned int id, unsigned long long from, unsigned long long to,
                    unsigned int flags, void *ctx) {
    (void)from, (void)to, (void)flags;
    struct counts *c = ctx;
    c->hits++;
    if (c->by_line) c->by_line[id]++;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PATTERNS CORPUS_DIR SECONDS\n", argv[0]);
        return 2;
    }
    double seconds = atof(argv[3]);

    /* Patterns: one per line; each checked alone first so that one rejected pattern is
     * reported and skipped instead of failing the whole database. */
    size_t text_len;
    char *text = read_file(argv[1], &text_len);
    text = xrealloc(text, text_len + 1);
    text[text_len] = '\0';
    const char **exprs = NULL;
    unsigned *flags = NULL, *ids = NULL;
    unsigned n = 0, lines = 0, skipped = 0;
    for (char *save = NULL, *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        lines++;
        unsigned f = HS_FLAG_CASELESS | HS_FLAG_SINGLEMATCH;
        if (needs_utf8(line)) f |= HS_FLAG_UTF8;
        hs_database_t *one = NULL;
        hs_compile_error_t *err = NULL;
        if (hs_compile(line, f, HS_MODE_BLOCK, NULL, &one, &err) != HS_SUCCESS) {
            fprintf(stderr, "hs_scan: skipped pattern %u (%s): %s\n", lines, err ? err->message : "?", line);
            hs_free_compile_error(err);
            skipped++;
            continue;
        }
        hs_free_database(one);
        exprs = xrealloc(exprs, (n + 1) * sizeof *exprs);
        flags = xrealloc(flags, (n + 1) * sizeof *flags);
        ids = xrealloc(ids, (n + 1) * sizeof *ids);
        exprs[n] = line;
        flags[n] = f;
        ids[n] = lines;
        n++;
    }
    if (n == 0) {
        fprintf(stderr, "hs_scan: no pattern compiled\n");
        return 1;
    }
    hs_database_t *db = NULL;
    hs_compile_error_t *err = NULL;
    if (hs_compile_multi(exprs, flags, ids, n, HS_MODE_BLOCK, NULL, &db, &err) != HS_SUCCESS) {
        fprintf(stderr, "hs_scan: hs_compile_multi: %s (expression %d)\n", err->message, err->expression);
        return 1;
    }
    hs_scratch_t *scratch = NULL;
    if (hs_alloc_scratch(db, &scratch) != HS_SUCCESS) {
        fprintf(stderr, "hs_scan: hs_alloc_scratch failed\n");
        return 1;
    }

    /* The corpus, all in memory so that only scanning is timed. */
    DIR *dir = opendir(argv[2]);
    if (!dir) die(argv[2]);
    struct body *bodies = NULL;
    size_t nbodies = 0, bytes = 0;
    for (struct dirent *e; (e = readdir(dir));) {
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", argv[2], e->d_name);
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        bodies = xrealloc(bodies, (nbodies + 1) * sizeof *bodies);
        bodies[nbodies].data = read_file(path, &bodies[nbodies].len);
        bytes += bodies[nbodies].len;
        nbodies++;
    }
    closedir(dir);
    if (nbodies == 0) {
        fprintf(stderr, "hs_scan: no files in %s\n", argv[2]);
        return 1;
    }

    unsigned long long matches = 0, bodies_matched = 0;
    unsigned long long *by_line = calloc(lines + 1, sizeof *by_line);
    if (!by_line) die("out of memory");
    unsigned long passes = 0;
    double t0 = now(), elapsed;
    do {
        for (size_t i = 0; i < nbodies; i++) {
            struct counts c = {0, passes == 0 ? by_line : NULL};
            hs_error_t rc = hs_scan(db, bodies[i].data, (unsigned)bodies[i].len, 0, scratch, on_match, &c);
            if (rc != HS_SUCCESS) {
                fprintf(stderr, "hs_scan: hs_scan failed: %d\n", rc);
                return 1;
            }
            if (passes == 0) {
                matches += c.hits;
                bodies_matched += c.hits > 0;
            }
        }
        passes++;
        elapsed = now() - t0;
    } while (elapsed < seconds);

    printf("{\"mbps\":%.3f,\"bytes_per_pass\":%zu,\"files\":%zu,\"passes\":%lu,\"seconds\":%.3f,"
           "\"patterns\":%u,\"skipped\":%u,\"matches\":%llu,\"bodies_matched\":%llu,\"hs_version\":\"%s\","
           "\"bodies_matched_by_line\":{",
           (double)bytes * (double)passes / elapsed / 1e6, bytes, nbodies, passes, elapsed, n, skipped, matches,
           bodies_matched, hs_version());
    for (unsigned line = 1, first = 1; line <= lines; line++) {
        if (!by_line[line]) continue;
        printf("%s\"%u\":%llu", first ? "" : ",", line, by_line[line]);
        first = 0;
    }
    printf("}}\n");
    hs_free_scratch(scratch);
    hs_free_database(db);
    return 0;
}
