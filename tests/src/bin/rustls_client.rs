//! `rustls_client PORT PATH BODY [LINGER_MS [SERVER_NAME]]`: one HTTPS POST to
//! 127.0.0.1:PORT through rustls (compiled in, nothing exported for a uprobe), its
//! ClientHello naming SERVER_NAME (`localhost` unless given), prints the status line, and
//! stays LINGER_MS more (a service lives on; a process gone before the agent looks at it is
//! reported without its executable). The
//! blind-spot tests use it as a TLS client the agent's capture cannot see. Like the other
//! test clients (`curl -k`), it does not check the mock's self-signed certificate; the
//! handshake's signatures are still verified.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::Arc,
};

use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

/// Any server certificate (the mock's is self-signed); handshake signatures checked.
#[derive(Debug)]
struct AnyCert(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (port, path, body, linger, server_name) = match &args[..] {
        [_, port, path, body] => (port, path, body, "0", "localhost"),
        [_, port, path, body, linger] => (port, path, body, linger.as_str(), "localhost"),
        [_, port, path, body, linger, name] => (port, path, body, linger.as_str(), name.as_str()),
        _ => {
            eprintln!("usage: rustls_client PORT PATH BODY [LINGER_MS [SERVER_NAME]]");
            std::process::exit(2);
        }
    };
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(AnyCert(provider.signature_verification_algorithms));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let linger = linger.parse::<u64>().expect("LINGER_MS");
    let name = ServerName::try_from(server_name.to_owned()).expect("a server name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("a TLS client");
    let sock = TcpStream::connect(("127.0.0.1", port.parse::<u16>().expect("a port"))).expect("connecting");
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {server_name}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).expect("sending the request");
    let mut response = Vec::new();
    // The mock closes after its answer (Connection: close); a TLS close without close_notify
    // still ends the read with what arrived.
    let _ = tls.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    println!("{}", text.lines().next().unwrap_or(""));
    std::thread::sleep(std::time::Duration::from_millis(linger));
}
