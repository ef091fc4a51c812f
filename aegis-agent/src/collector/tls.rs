//! TLS of the collector and of its clients: PEM files in, rustls configurations out.
//!
//! Both sides trust only the CA the operator names (no system roots): the collector's
//! clients are the fleet's agents, and the agents ship to their own collector. The
//! collector asks every client for a certificate but lets a connection without one finish
//! its handshake, so that such a client gets an HTTP 401 with a JSON body saying what to do
//! rather than a bare TLS alert; a certificate that does not chain to the CA is refused in
//! the handshake (rustls's WebPKI verifier).

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

/// The certificates of a PEM file (at least one).
pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| anyhow::anyhow!("cannot read certificates from {}: {e}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display());
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow::anyhow!("cannot read a PEM private key from {}: {e}", path.display()))
}

fn roots(ca: &Path) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    Ok(Arc::new(roots))
}

/// The collector's TLS: its certificate and key, client certificates checked against `ca`.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder(roots(ca)?)
        .allow_unauthenticated()
        .build()
        .with_context(|| format!("cannot check client certificates against {}", ca.display()))?;
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .with_context(|| format!("{} and {} are not a certificate and its key", cert.display(), key.display()))?;
    Ok(Arc::new(config))
}

/// A client's TLS: the collector's certificate checked against `ca`; a client certificate
/// when `identity` gives one (certificate chain, key).
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> anyhow::Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots(ca)?);
    Ok(match identity {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?).with_context(|| {
            format!("{} and {} are not a client certificate and its key", cert.display(), key.display())
        })?,
        None => builder.with_no_client_auth(),
    })
}

/// Whether the end-entity certificate `cert` names `identity` in its subjectAltName (a DNS
/// name, or an IP address). The subject's CN is not read: certificates name hosts in SANs
/// (RFC 6125), and WebPKI ignores the CN too.
pub fn cert_names(cert: &CertificateDer<'_>, identity: &str) -> bool {
    let Ok(name) = ServerName::try_from(identity) else { return false };
    webpki::EndEntityCert::try_from(cert).is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
}

/// Whether `identity` can be a client identity ([`cert_names`]).
pub fn valid_identity(identity: &str) -> bool {
    ServerName::try_from(identity).is_ok()
}
