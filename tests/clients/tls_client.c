/* A minimal HTTPS client over OpenSSL's SSL_* API, built by the tests crate's build script
 * against two libraries that offer it: BoringSSL (Debian's android-libboringssl, a shared
 * library) and OpenSSL linked in statically (libssl.a, so its functions are in the
 * executable's static symbol table and exported by nothing), plain and stripped.
 *
 * Usage: tls_client PORT REQUEST_FILE [LINGER_MS]
 * Connects to 127.0.0.1:PORT (SNI "localhost", certificate not checked: the mock's is
 * self-signed), writes the bytes of REQUEST_FILE (raw HTTP/1.1 requests) with SSL_write,
 * then copies what SSL_read returns to standard output until the server closes; then stays
 * LINGER_MS milliseconds, as a service would. With TLS_CLIENT_DELAY_MS in the environment,
 * it waits that long before connecting (a service's start-up). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int fail(const char *what) {
    fprintf(stderr, "tls_client: %s\n", what);
    ERR_print_errors_fp(stderr);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: tls_client PORT REQUEST_FILE [LINGER_MS]\n");
        return 2;
    }
    const char *delay = getenv("TLS_CLIENT_DELAY_MS");
    if (delay) usleep((useconds_t)atoi(delay) * 1000);
    FILE *f = fopen(argv[2], "rb");
    if (!f) return fail("cannot open the request file");
    static char request[1 << 20];
    size_t len = fread(request, 1, sizeof request, f);
    fclose(f);

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[1]));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) return fail("cannot connect");

    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) return fail("SSL_CTX_new");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL *ssl = SSL_new(ctx);
    if (!ssl) return fail("SSL_new");
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, "localhost");
    if (SSL_connect(ssl) != 1) return fail("TLS handshake failed");

    size_t sent = 0;
    while (sent < len) {
        int n = SSL_write(ssl, request + sent, (int)(len - sent));
        if (n <= 0) return fail("SSL_write failed");
        sent += (size_t)n;
    }
    char buf[16384];
    for (;;) {
        int n = SSL_read(ssl, buf, sizeof buf);
        if (n <= 0) break;
        fwrite(buf, 1, (size_t)n, stdout);
    }
    SSL_shutdown(ssl);
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(fd);
    fflush(stdout);
    if (argc == 4) usleep((useconds_t)atoi(argv[3]) * 1000);
    return 0;
}
