//! HTTP/1.1-over-TLS load loop in one process, for measuring the agent's overhead.
//!
//! A server thread per connection and a client thread per connection talk over loopback
//! keep-alive TLS connections (TCP_NODELAY) through the `openssl` crate, i.e. the system
//! `libssl.so.3` the agent hooks. By default each request is a realistic ~1 KB OpenAI chat
//! request answered by a ~1 KB JSON completion with usage; `--path /health` makes it
//! ordinary (non-LLM) traffic instead. Content-Length framing; full messages are read.
//! Each request's body is its own: the user message ends with the request's number (ten
//! digits, so every body has the same length), as no two prompts of real traffic are the
//! same bytes.
//!
//! `--http2` speaks HTTP/2 instead (client preface, SETTINGS, one stream per request,
//! HEADERS and DATA written together, HPACK literals without indexing, WINDOW_UPDATEs for
//! what was received), still one request at a time per connection: the same bytes of
//! content, framed the other way.
//!
//! Usage: tls_loop [--duration SECS | --requests N] [--connections C] [--path PATH] [--http2]
//! Prints one JSON line: {"requests":N,"seconds":S,"rps":R}

use std::{
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use openssl::{
    asn1::Asn1Time,
    bn::BigNum,
    ec::{EcGroup, EcKey},
    hash::MessageDigest,
    nid::Nid,
    pkey::{PKey, Private},
    ssl::{SslAcceptor, SslConnector, SslMethod, SslStream, SslVerifyMode},
    x509::{X509, X509NameBuilder},
};

const LLM_PATH: &str = "/v1/chat/completions";

struct Args {
    duration: Option<f64>,
    requests: Option<u64>,
    connections: usize,
    path: String,
    http2: bool,
}

fn parse_args() -> Args {
    let mut args = Args { duration: None, requests: None, connections: 1, path: LLM_PATH.into(), http2: false };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--duration" => args.duration = Some(value().parse().unwrap_or_else(|_| usage("bad --duration"))),
            "--requests" => args.requests = Some(value().parse().unwrap_or_else(|_| usage("bad --requests"))),
            "--connections" => args.connections = value().parse().unwrap_or_else(|_| usage("bad --connections")),
            "--path" => args.path = value(),
            "--http2" => args.http2 = true,
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if args.duration.is_none() && args.requests.is_none() {
        args.duration = Some(5.0);
    }
    if args.connections == 0 {
        usage("--connections must be at least 1");
    }
    args
}

fn usage(err: &str) -> ! {
    if !err.is_empty() {
        eprintln!("tls_loop: {err}");
    }
    eprintln!("usage: tls_loop [--duration SECS | --requests N] [--connections C] [--path PATH] [--http2]");
    std::process::exit(2);
}

/// A throwaway self-signed P-256 certificate for "localhost".
fn self_signed() -> Result<(X509, PKey<Private>), openssl::error::ErrorStack> {
    let key = PKey::from_ec_key(EcKey::generate(EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?.as_ref())?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, "localhost")?;
    let name = name.build();
    let mut cert = X509::builder()?;
    cert.set_version(2)?;
    cert.set_serial_number(BigNum::from_u32(1)?.to_asn1_integer()?.as_ref())?;
    cert.set_subject_name(&name)?;
    cert.set_issuer_name(&name)?;
    cert.set_pubkey(&key)?;
    cert.set_not_before(Asn1Time::days_from_now(0)?.as_ref())?;
    cert.set_not_after(Asn1Time::days_from_now(1)?.as_ref())?;
    cert.sign(&key, MessageDigest::sha256())?;
    Ok((cert.build(), key))
}

/// An HTTP/2 frame: type, flags, stream, payload.
type Frame = (u8, u8, u32, Vec<u8>);

/// A TLS stream with a read buffer, reading and writing Content-Length framed messages.
struct Conn {
    tls: SslStream<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads one message: (head text, body). None on a clean EOF between messages.
    fn read_message(&mut self) -> io::Result<Option<(String, Vec<u8>)>> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill()? {
                return if self.buf.is_empty() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let length = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.trim().parse::<usize>().map_err(|_| io::Error::other("bad Content-Length")))
            .transpose()?
            .unwrap_or(0);
        while self.buf.len() < head_end + length {
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        self.buf.drain(..head_end + length);
        Ok(Some((head, body)))
    }

    /// Reads more bytes; false on EOF.
    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        match self.tls.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            // A peer closing without close_notify counts as EOF here.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted || e.kind() == io::ErrorKind::UnexpectedEof => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads one HTTP/2 frame: (type, flags, stream, payload). None on a clean EOF between
    /// frames.
    fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        while self.buf.len() < 9 {
            if !self.fill()? {
                return if self.buf.is_empty() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
            }
        }
        let len = usize::from(self.buf[0]) << 16 | usize::from(self.buf[1]) << 8 | usize::from(self.buf[2]);
        while self.buf.len() < 9 + len {
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let (ty, flags) = (self.buf[3], self.buf[4]);
        let stream = u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]) & 0x7fff_ffff;
        let payload = self.buf[9..9 + len].to_vec();
        self.buf.drain(..9 + len);
        Ok(Some((ty, flags, stream, payload)))
    }

    /// Reads exactly `n` bytes (the client preface).
    fn read_exact_buffered(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.write_all(bytes)?;
        self.tls.flush()
    }

    /// Writes head and body in one TLS write.
    fn send(&mut self, head: &str, body: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(head.len() + body.len());
        msg.extend_from_slice(head.as_bytes());
        msg.extend_from_slice(body);
        self.tls.write_all(&msg)?;
        self.tls.flush()
    }
}

/// Where the request number goes in [`llm_request_body`].
const NUMBER_MARK: &str = "#0000000000";

/// Every request of the process gets the next number.
static REQUEST_NUMBER: AtomicU64 = AtomicU64::new(0);

/// Where the mark of `body` (from [`llm_request_body`]) is, if it has one.
fn mark_of(body: &[u8]) -> Option<usize> {
    body.windows(NUMBER_MARK.len()).position(|w| w == NUMBER_MARK.as_bytes())
}

/// Write the next request number over the mark of `body`, at `mark` ([`mark_of`]).
fn number(body: &mut [u8], mark: Option<usize>) {
    if let Some(at) = mark {
        let n = REQUEST_NUMBER.fetch_add(1, Ordering::Relaxed) % 10_000_000_000;
        body[at + 1..at + NUMBER_MARK.len()].copy_from_slice(format!("{n:010}").as_bytes());
    }
}

/// ~1 KB OpenAI chat completion request body, its number at [`NUMBER_MARK`].
fn llm_request_body() -> String {
    let system = "You are a careful assistant for an infrastructure team. Answer precisely, cite the \
                  configuration keys involved, and keep answers under two hundred words.";
    let user = "Our fleet of build agents shows intermittent TLS handshake failures when talking to \
                the artifact cache. The failures started after we rotated intermediate certificates \
                last Tuesday. Which checks should we run first, in order, to confirm whether the \
                chain served by the cache is incomplete, and how do we verify the fix from a client? \
                We already checked that the system clocks are in sync and that the cache presents \
                the new leaf certificate; the old intermediate expires at the end of next month, so \
                we would like a plan that covers both the immediate failures and the later expiry, \
                plus the monitoring we should add so that the next rotation does not surprise us. #0000000000";
    format!(
        r#"{{"model":"gpt-4o-mini","temperature":0.2,"max_tokens":400,"user":"tls-loop-bench","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{user}"}}]}}"#
    )
}

/// ~1 KB chat completion answer with usage.
fn llm_response_body() -> String {
    let answer = "First, fetch the chain the cache serves with openssl s_client -showcerts and \
                  compare it with the new intermediate bundle; a missing intermediate is the usual \
                  cause after a rotation. Second, check each agent's trust store for the new root \
                  and clear any pinned fingerprints. Third, confirm the cache reloaded its \
                  certificate files instead of serving the old chain from memory. To verify the \
                  fix, run a handshake from one build agent with verification enabled and watch \
                  the failure rate in the cache access logs for an hour. Finally, add an alert on \
                  handshake errors per client and a weekly job that checks the served chain.";
    format!(
        r#"{{"id":"chatcmpl-tlsloop","object":"chat.completion","created":1764176400,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"message":{{"role":"assistant","content":"{answer}"}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":142,"completion_tokens":118,"total_tokens":260}},"system_fingerprint":"fp_tlsloop"}}"#
    )
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_DATA: u8 = 0x0;
const H2_HEADERS: u8 = 0x1;
const H2_SETTINGS: u8 = 0x4;
const H2_WINDOW_UPDATE: u8 = 0x8;
const H2_END_STREAM: u8 = 0x1;
const H2_END_HEADERS: u8 = 0x4;

fn h2_frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK literal field without indexing, new name (RFC 7541 §6.2.2); short strings only.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127, "short literals only");
    out.push(0);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// Credit the peer with `n` received bytes on the connection.
fn h2_window_update(out: &mut Vec<u8>, n: usize) {
    if n > 0 {
        h2_frame(out, H2_WINDOW_UPDATE, 0, 0, &(n as u32).to_be_bytes());
    }
}

fn serve_h2(mut conn: Conn) -> io::Result<()> {
    if conn.read_exact_buffered(H2_PREFACE.len())? != H2_PREFACE {
        return Err(io::Error::other("no HTTP/2 client preface"));
    }
    let llm = llm_response_body();
    let mut out = Vec::new();
    h2_frame(&mut out, H2_SETTINGS, 0, 0, &[]);
    let mut received = 0;
    while let Some((ty, flags, stream, payload)) = conn.read_frame()? {
        let ended = flags & H2_END_STREAM != 0;
        match ty {
            H2_SETTINGS if flags & 1 == 0 => h2_frame(&mut out, H2_SETTINGS, 1, 0, &[]),
            H2_DATA => received += payload.len(),
            _ => {}
        }
        if !(ended && matches!(ty, H2_HEADERS | H2_DATA)) {
            continue;
        }
        // A request without a body is the ordinary one.
        let body = if ty == H2_HEADERS { r#"{"status":"ok"}"# } else { llm.as_str() };
        h2_window_update(&mut out, std::mem::take(&mut received));
        let mut block = vec![0x88]; // :status 200 (static table)
        hpack_literal(&mut block, "content-type", "application/json");
        hpack_literal(&mut block, "content-length", &body.len().to_string());
        h2_frame(&mut out, H2_HEADERS, H2_END_HEADERS, stream, &block);
        h2_frame(&mut out, H2_DATA, H2_END_STREAM, stream, body.as_bytes());
        conn.write_all(&out)?;
        out.clear();
    }
    Ok(())
}

/// One HTTP/2 client connection, one stream at a time.
fn client_h2(mut conn: Conn, port: u16, path: &str, next: &dyn Fn() -> bool) -> io::Result<u64> {
    let mut body = if path == "/health" { Vec::new() } else { llm_request_body().into_bytes() };
    let mark = mark_of(&body);
    let mut out = H2_PREFACE.to_vec();
    h2_frame(&mut out, H2_SETTINGS, 0, 0, &[]);
    let (mut count, mut stream, mut received) = (0, 1u32, 0);
    while next() {
        h2_window_update(&mut out, std::mem::take(&mut received));
        number(&mut body, mark);
        let mut block = Vec::new();
        hpack_literal(&mut block, ":method", if body.is_empty() { "GET" } else { "POST" });
        hpack_literal(&mut block, ":scheme", "https");
        hpack_literal(&mut block, ":path", path);
        hpack_literal(&mut block, ":authority", &format!("127.0.0.1:{port}"));
        hpack_literal(&mut block, "user-agent", "tls_loop/1");
        hpack_literal(&mut block, "authorization", "Bearer sk-tls-loop-benchmark");
        hpack_literal(&mut block, "accept", "application/json");
        if body.is_empty() {
            h2_frame(&mut out, H2_HEADERS, H2_END_HEADERS | H2_END_STREAM, stream, &block);
        } else {
            hpack_literal(&mut block, "content-type", "application/json");
            hpack_literal(&mut block, "content-length", &body.len().to_string());
            h2_frame(&mut out, H2_HEADERS, H2_END_HEADERS, stream, &block);
            h2_frame(&mut out, H2_DATA, H2_END_STREAM, stream, &body);
        }
        conn.write_all(&out)?;
        out.clear();
        loop {
            let (ty, flags, id, payload) = conn.read_frame()?.ok_or_else(|| io::Error::other("server closed"))?;
            match ty {
                H2_SETTINGS if flags & 1 == 0 => h2_frame(&mut out, H2_SETTINGS, 1, 0, &[]),
                H2_HEADERS if id == stream && payload.first() != Some(&0x88) => {
                    return Err(io::Error::other("unexpected response status"));
                }
                H2_DATA => received += payload.len(),
                _ => {}
            }
            if id == stream && flags & H2_END_STREAM != 0 {
                break;
            }
        }
        count += 1;
        stream += 2;
    }
    let _ = conn.tls.shutdown();
    Ok(count)
}

fn serve(acceptor: Arc<SslAcceptor>, tcp: TcpStream, http2: bool) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let tls = acceptor.accept(tcp).map_err(io::Error::other)?;
    let mut conn = Conn { tls, buf: Vec::new() };
    if http2 {
        return serve_h2(conn);
    }
    let llm = llm_response_body();
    while let Some((head, _body)) = conn.read_message()? {
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let body = if path == "/health" { r#"{"status":"ok"}"# } else { llm.as_str() };
        let resp =
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
        conn.send(&resp, body.as_bytes())?;
    }
    Ok(())
}

/// One client connection: sends requests until `done()` says stop; returns how many.
fn client(port: u16, path: &str, http2: bool, next: &dyn Fn() -> bool) -> io::Result<u64> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_nodelay(true)?;
    let mut connector = SslConnector::builder(SslMethod::tls_client()).map_err(io::Error::other)?;
    connector.set_verify(SslVerifyMode::NONE);
    let tls = connector.build().connect("localhost", tcp).map_err(io::Error::other)?;
    let mut conn = Conn { tls, buf: Vec::new() };
    if http2 {
        return client_h2(conn, port, path, next);
    }
    let mut body = if path == "/health" { Vec::new() } else { llm_request_body().into_bytes() };
    let mark = mark_of(&body);
    let method = if body.is_empty() { "GET" } else { "POST" };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: tls_loop/1\r\n\
         Authorization: Bearer sk-tls-loop-benchmark\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut count = 0;
    while next() {
        number(&mut body, mark);
        conn.send(&head, &body)?;
        let (resp_head, _) = conn.read_message()?.ok_or_else(|| io::Error::other("server closed"))?;
        if !resp_head.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!("unexpected response: {resp_head}")));
        }
        count += 1;
    }
    let _ = conn.tls.shutdown();
    Ok(count)
}

fn main() {
    let args = parse_args();
    let (cert, key) = self_signed().expect("making a certificate");
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("TLS server context");
    acceptor.set_certificate(&cert).expect("certificate");
    acceptor.set_private_key(&key).expect("key");
    let acceptor = Arc::new(acceptor.build());

    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1");
    let port = listener.local_addr().expect("local address").port();
    let http2 = args.http2;
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let acceptor = Arc::clone(&acceptor);
            std::thread::spawn(move || {
                if let Err(e) = serve(acceptor, tcp, http2) {
                    eprintln!("tls_loop server: {e}");
                }
            });
        }
    });

    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = args.duration.map(|s| start + Duration::from_secs_f64(s));
    let clients: Vec<_> = (0..args.connections)
        .map(|_| {
            let (issued, path, limit) = (Arc::clone(&issued), args.path.clone(), args.requests);
            std::thread::spawn(move || {
                let next = || match limit {
                    Some(n) => issued.fetch_add(1, Ordering::Relaxed) < n,
                    None => deadline.is_some_and(|d| Instant::now() < d),
                };
                client(port, &path, http2, &next)
            })
        })
        .collect();
    let mut total = 0;
    for c in clients {
        match c.join().expect("client thread panicked") {
            Ok(n) => total += n,
            Err(e) => {
                eprintln!("tls_loop client: {e}");
                std::process::exit(1);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("{{\"requests\":{total},\"seconds\":{seconds:.3},\"rps\":{:.1}}}", total as f64 / seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_body_has_its_own_number_and_the_same_length() {
        let mut a = llm_request_body().into_bytes();
        let mut b = a.clone();
        let mark = mark_of(&a);
        assert!(mark.is_some());
        number(&mut a, mark);
        number(&mut b, mark);
        assert_ne!(a, b);
        assert_eq!(a.len(), b.len());
        let v: serde_json::Value = serde_json::from_slice(&b).expect("valid JSON");
        assert!(!v["messages"][1]["content"].as_str().unwrap().ends_with(NUMBER_MARK));
    }

    #[test]
    fn bodies_are_about_1kb_of_valid_json() {
        for body in [llm_request_body(), llm_response_body()] {
            let v: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
            assert!(v.is_object());
            assert!((800..1400).contains(&body.len()), "{} bytes", body.len());
        }
    }

    #[test]
    fn loop_completes_requests() {
        let (cert, key) = self_signed().unwrap();
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        acceptor.set_certificate(&cert).unwrap();
        acceptor.set_private_key(&key).unwrap();
        let acceptor = Arc::new(acceptor.build());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for (tcp, http2) in listener.incoming().zip([false, true]) {
                serve(Arc::clone(&acceptor), tcp.unwrap(), http2).unwrap();
            }
        });
        for http2 in [false, true] {
            let left = AtomicU64::new(0);
            let n = client(port, LLM_PATH, http2, &|| left.fetch_add(1, Ordering::Relaxed) < 25).unwrap();
            assert_eq!(n, 25, "http2: {http2}");
        }
    }
}
